"""kind = "postgres-discovery": every database of an instance becomes a child source (real PostgreSQL 15)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import pytest
import trio_asyncio
from pgserver import ServerHandle, quote_ident, quote_literal

from reaper import db
from reaper.config.schema import SourceConfig
from reaper.errors import SourceUnavailable
from reaper.kinds import check_source, database_child, is_discovery, resolve, with_database

pytestmark = pytest.mark.pg


@pytest.fixture
def prefix(pg15: ServerHandle) -> Iterator[str]:
    """A unique database-name prefix; every database starting with it is dropped afterwards."""
    stem = f"kd_{uuid.uuid4().hex[:8]}_"
    yield stem
    names = pg15.psql(f"select datname from pg_database where datname like {quote_literal(stem + '%')}")
    for name in filter(None, names.splitlines()):
        pg15.psql(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")


@pytest.fixture
def monitor(pg15: ServerHandle) -> Iterator[tuple[str, str]]:
    name, password = f"kdmon_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    pg15.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pg_monitor")
    yield name, password
    pg15.psql(f"DROP ROLE {name}")


def create(pg: ServerHandle, name: str) -> None:
    pg.psql(f"CREATE DATABASE {quote_ident(name)}")


def source(pg: ServerHandle, **kwargs: object) -> SourceConfig:
    base = {"name": "inst", "dsn": pg.dsn(), "kind": "postgres-discovery", "preset": "basic",
            "metrics": {"wal": 0}, "tags": {"env": "t"}, "query_timeout_seconds": 7.0}
    return SourceConfig(**{**base, **kwargs})  # type: ignore[arg-type]


async def test_five_databases_then_a_sixth_created_and_one_dropped_are_followed(pg15: ServerHandle,
                                                                                prefix: str) -> None:
    names = [f"{prefix}{i}" for i in range(5)]
    for name in names:
        create(pg15, name)
    src = source(pg15, include_pattern=f"^{prefix}")
    assert is_discovery(src) and check_source(src) == []
    async with trio_asyncio.open_loop():
        children = await resolve(src)
        assert [c.name for c in children] == [f"inst_{n}" for n in names]
        for child, name in zip(children, names, strict=True):
            assert child.kind == "postgres" and child.dsn == pg15.dsn(dbname=name)
            assert (child.preset, child.metrics, child.tags, child.query_timeout_seconds) == (
                "basic", {"wal": 0}, {"env": "t"}, 7.0)
            assert child.include_pattern is None and not is_discovery(child)
        create(pg15, f"{prefix}5")
        pg15.psql(f"DROP DATABASE {quote_ident(names[0])}")
        again = await resolve(src)
    assert [c.name for c in again] == [f"inst_{n}" for n in [*names[1:], f"{prefix}5"]]


async def test_templates_no_connect_and_patterns_are_left_out(pg15: ServerHandle, prefix: str,
                                                              monitor: tuple[str, str]) -> None:
    for suffix in ("app", "app_archive", "closed", "private", "tmpl"):
        create(pg15, prefix + suffix)
    pg15.psql(f"ALTER DATABASE {prefix}closed ALLOW_CONNECTIONS false;"
              f" UPDATE pg_database SET datistemplate = true WHERE datname = '{prefix}tmpl';"
              f" REVOKE CONNECT ON DATABASE {prefix}private FROM PUBLIC")
    try:
        user, password = monitor
        src = source(pg15, dsn=pg15.dsn(user=user, password=password), include_pattern=f"^{prefix}",
                     exclude_pattern="_archive$")
        async with trio_asyncio.open_loop():
            children = await resolve(src)
            assert [c.name for c in children] == [f"inst_{prefix}app"]  # private: no CONNECT for this role
            everything = await resolve(source(pg15))  # no pattern (blank counts as none too)
            blank = await resolve(source(pg15, include_pattern="  ", exclude_pattern=""))
    finally:
        pg15.psql(f"UPDATE pg_database SET datistemplate = false WHERE datname = '{prefix}tmpl'")
    names = {c.name for c in everything}
    assert {"inst_postgres", f"inst_{prefix}app", f"inst_{prefix}app_archive", f"inst_{prefix}private"} <= names
    assert not names & {"inst_template0", "inst_template1", f"inst_{prefix}closed", f"inst_{prefix}tmpl"}
    assert {c.name for c in blank} == names


async def test_odd_database_names_round_trip_through_the_child_dsn(pg15: ServerHandle, prefix: str) -> None:
    odd = [f"{prefix}Mixed Case", f"{prefix}sl/ash %25 ?#&=;", f"{prefix}quo'te\"s", f"{prefix}été"]
    for name in odd:
        create(pg15, name)
    async with trio_asyncio.open_loop():
        children = await resolve(source(pg15, include_pattern=f"^{prefix}"))
        assert sorted(c.name for c in children) == sorted(f"inst_{n}" for n in odd)
        for child in children:
            conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(child.dsn)
            try:
                got = await trio_asyncio.aio_as_trio(conn.fetchval)("select current_database()")
            finally:
                await trio_asyncio.aio_as_trio(conn.close)()
            assert child.name == f"inst_{got}"
            # the regular connection path (reaper.db) reads the same database
            sc = await db.open_source_connection(child.dsn, statement_timeout_seconds=5)
            assert sc.server.database == got
            await sc.close()


def test_with_database_keeps_the_rest_of_the_dsn() -> None:
    dsn = "postgresql://u:p%40ss@h1:5432,h2:5433/app?sslmode=require&dbname=other&application_name=x"
    assert with_database(dsn, "new db") == (
        "postgresql://u:p%40ss@h1:5432,h2:5433/new%20db?sslmode=require&application_name=x")
    assert with_database("host=h dbname=app user=u", "o'k") == "host=h dbname='o\\'k' user=u"
    assert with_database("host=h", "x") == "host=h dbname='x'"
    child = database_child(SourceConfig(name="s", dsn="postgres://h/app", kind="postgres-discovery",
                                        include_pattern="a", password_file="/pw", only_if_primary=True), "b")
    assert (child.name, child.dsn, child.kind, child.include_pattern, child.password_file, child.only_if_primary) == (
        "s_b", "postgres://h/b", "postgres", None, "/pw", True)


async def test_a_failed_listing_is_source_unavailable(pg15: ServerHandle) -> None:
    async with trio_asyncio.open_loop():
        with pytest.raises(SourceUnavailable, match="invalid regular expression"):
            # (a range out of order: the server's to refuse; config checks catch an unclosed group before this)
            await resolve(source(pg15, include_pattern="[z-a]"))
        with pytest.raises(SourceUnavailable, match="listing databases failed"):
            await resolve(source(pg15, dsn=f"postgresql://postgres@127.0.0.1:{pg15.port}/no_such_db_here"))
        with pytest.raises(SourceUnavailable):
            await resolve(source(pg15, dsn="postgresql://postgres@127.0.0.1:1/postgres"))
        with pytest.raises(SourceUnavailable, match="password_file"):
            await resolve(source(pg15, password_file="/nonexistent/pw"))
    concrete = SourceConfig(name="c", dsn=pg15.dsn())
    assert await resolve(concrete) == [concrete]  # a concrete kind stands for itself
