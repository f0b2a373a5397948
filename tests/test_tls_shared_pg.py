"""Source connections share one TLS context instead of one each (issue 14: ~15 KB of OpenSSL memory per
connection, kept for its life even when the server declined TLS), and libpq's `prefer` keeps its meaning:
TLS when the server offers it, plain when it does not or when pg_hba.conf refuses TLS sessions. Real
PostgreSQL 15 servers: the session one (no TLS) and one of this module's with a self-signed certificate."""

from __future__ import annotations

import gc
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from pgserver import PgServer

from reaper import db
from reaper.db import tls
from reaper.errors import SourceUnavailable

pytestmark = pytest.mark.pg


def contexts_alive() -> list[ssl.SSLContext]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, ssl.SSLContext)]


async def open_several(dsn: str, n: int) -> tuple[list[bool], int]:
    """Open n source connections at once; (whether each runs over TLS, SSL contexts alive meanwhile)."""
    async with db.open_loop():
        conns = []
        try:
            for _ in range(n):
                with trio.fail_after(20):
                    conns.append(await db.open_source_connection(dsn, statement_timeout_seconds=10))
            over_tls = [(await c.fetch("select ssl from pg_stat_ssl where pid = pg_backend_pid()"))[0]["ssl"]
                        for c in conns]
            alive = len(contexts_alive())
        finally:
            for c in conns:
                await c.close()
    return over_tls, alive


@pytest.fixture(scope="module")
def tls_server() -> Iterator[PgServer]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (.ci/run installs it)")
    with PgServer.create(major=15) as server:
        crt, key = server.datadir / "server.crt", server.datadir / "server.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(crt)],
                       check=True, capture_output=True, timeout=60)
        shutil.chown(crt, "postgres", "postgres")
        shutil.chown(key, "postgres", "postgres")
        key.chmod(0o600)
        server.psql("ALTER SYSTEM SET ssl = on")
        server.psql("SELECT pg_reload_conf()")
        yield server


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tls, "_plain_since", {})
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql of the user running the tests
    for name in ("PGSSLMODE", *tls.OWN_CONTEXT_ENV):
        monkeypatch.delenv(name, raising=False)


def test_plain_server_prefer_connects_without_a_context_per_connection(pg15: PgServer) -> None:
    before = len(contexts_alive())
    over_tls, alive = trio.run(open_several, pg15.dsn(), 4)
    assert over_tls == [False] * 4
    assert alive - before <= 1  # the shared one at most (asyncpg made 4)
    assert pg15.dsn() in tls._plain_since  # the next connections ask for plain at once


def test_tls_server_prefer_gets_tls_with_one_shared_context(tls_server: PgServer) -> None:
    before = len(contexts_alive())
    over_tls, alive = trio.run(open_several, tls_server.dsn(), 3)
    assert over_tls == [True] * 3
    assert alive - before <= 1
    assert tls_server.dsn() not in tls._plain_since


def test_require_is_kept_on_a_plain_server(pg15: PgServer) -> None:
    async def refused() -> str:
        async with db.open_loop():
            with pytest.raises(SourceUnavailable) as info, trio.fail_after(20):
                await db.open_source_connection(pg15.dsn() + "?sslmode=require", statement_timeout_seconds=10)
        return str(info.value)

    assert "rejected SSL upgrade" in trio.run(refused)
    assert pg15.dsn() + "?sslmode=require" not in tls._plain_since


def test_require_and_disable_on_a_tls_server(tls_server: PgServer) -> None:
    assert trio.run(open_several, tls_server.dsn() + "?sslmode=require", 2)[0] == [True, True]
    assert trio.run(open_several, tls_server.dsn() + "?sslmode=disable", 1)[0] == [False]


def test_prefer_falls_back_to_plain_when_pg_hba_refuses_tls(tls_server: PgServer) -> None:
    hba = tls_server.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("hostssl all all all reject\n" + original)
    tls_server.psql("SELECT pg_reload_conf()")
    try:
        assert trio.run(open_several, tls_server.dsn(), 2)[0] == [False, False]
    finally:
        hba.write_text(original)
        tls_server.psql("SELECT pg_reload_conf()")


@pytest.mark.parametrize(("suffix", "env", "home_file", "expected"), [
    ("", {}, None, "prefer"),
    ("?sslmode=require", {}, None, "require"),
    ("", {"PGSSLMODE": "require"}, None, "require"),
    ("?sslmode=disable", {}, None, None),
    ("?sslmode=verify-full", {}, None, None),
    ("?sslmode=allow", {}, None, None),
    ("?sslrootcert=/etc/ssl/ca.pem", {}, None, None),
    ("", {"PGSSLCERT": "/etc/ssl/me.pem"}, None, None),
    ("", {}, "postgresql.crt", None),
    ("?sslmode=require", {}, "root.crt", None),
    ("", {}, "root.crt", "prefer"),  # prefer never checks the server's certificate
])
def test_which_dsns_share_the_context(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suffix: str,
                                      env: dict[str, str], home_file: str | None, expected: str | None) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if home_file:
        (tmp_path / ".postgresql").mkdir()
        (tmp_path / ".postgresql" / home_file).write_text("x")
    assert tls.default_tls_mode("postgresql://u@db.example:5432/app" + suffix) == expected


def test_the_memory_of_plain_servers_is_bounded(pg15: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery's databases come and go: at most PLAIN_MEMORY_DSNS servers are remembered, the newest kept."""
    monkeypatch.setattr(tls, "PLAIN_MEMORY_DSNS", 2)
    dsns = [pg15.dsn() + f"?application_name=reaper{i}" for i in range(3)]
    for dsn in dsns:
        assert trio.run(open_several, dsn, 1)[0] == [False]
    assert len(tls._plain_since) <= 2 and dsns[-1] in tls._plain_since


def test_a_tls_connection_gets_its_keepalives_too(tls_server: PgServer) -> None:
    from test_libpq_params import keepalive_of

    async def options() -> tuple[bool, tuple[int, ...]]:
        async with db.open_loop():
            with trio.fail_after(20):
                conn = await db.open_source_connection(tls_server.dsn() + "?sslmode=require&keepalives_idle=9",
                                                       statement_timeout_seconds=10)
            try:
                ssl_on = (await conn.fetch("select ssl from pg_stat_ssl where pid = pg_backend_pid()"))[0]["ssl"]
                return ssl_on, keepalive_of(conn)
            finally:
                await conn.close()

    assert trio.run(options) == (True, (1, 9, 10, 6, 0))
