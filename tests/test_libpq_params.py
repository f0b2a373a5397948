"""libpq's connection parameters in a dsn (reaper.config.libpq): what asyncpg does not know must not reach the server.

asyncpg sends every dsn parameter it does not know to the server as a setting, which refuses the connection:
`connect_timeout=5`, `keepalives=1` or `fallback_application_name=x`, common in DSNs copied from libpq tools
and pgwatch configs, left the source down for ever; `target_session_attrs=read-write` never matched a primary
(asyncpg reads default_transaction_read_only, which reaper's sessions set on). What reaper cannot honour is
refused by `check`, one line.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from reaper import db
from reaper.config.libpq import asyncpg_dsn, parameter_problems

REAPER = [sys.executable, "-m", "reaper.cli"]
BASE = "postgresql://mon:pw@db1:5433/app"


@pytest.mark.parametrize(("dsn", "sent", "seconds"), [
    (BASE, BASE, None),
    (f"{BASE}?connect_timeout=7", BASE, 7.0),
    (f"{BASE}?connect_timeout=1&sslmode=require", f"{BASE}?sslmode=require", 2.0),  # libpq's minimum
    (f"{BASE}?connect_timeout=0", BASE, None),  # libpq: wait for ever (reaper's own deadline still holds)
    (f"{BASE}?keepalives=1&keepalives_idle=30&application_name=x&fallback_application_name=y",
     f"{BASE}?application_name=x", None),
    (f"{BASE}?gssencmode=disable&channel_binding=prefer&options=-c%20search_path%3Dmon",
     f"{BASE}?options=-c%20search_path%3Dmon", None),
    (f"{BASE}?target_session_attrs=read-write", f"{BASE}?target_session_attrs=primary", None),
    ("postgresql:///app?host=/run/postgresql&connect_timeout=3&", "postgresql:///app?host=/run/postgresql", 3.0),
])
def test_what_asyncpg_is_given(dsn: str, sent: str, seconds: float | None) -> None:
    assert asyncpg_dsn(dsn, read_only=True) == (sent, seconds)


def test_a_read_write_session_keeps_its_target_as_written() -> None:
    """A sink's session is read-write: asyncpg's own read-write test is right there."""
    assert asyncpg_dsn(f"{BASE}?target_session_attrs=read-write", read_only=False)[0] == (
        f"{BASE}?target_session_attrs=read-write")


@pytest.mark.parametrize(("dsn", "problem"), [
    (f"{BASE}?hostaddr=10.0.0.1", "hostaddr=10.0.0.1 is not supported: put the address in the host part of the dsn"),
    (f"{BASE}?gssencmode=require", "gssencmode=require is not supported (only disable, prefer, allow is taken)"),
    (f"{BASE}?channel_binding=require", "channel_binding=require is not supported"),
    (f"{BASE}?connect_timeout=5s", "connect_timeout '5s' is not a whole number of seconds"),
    (f"{BASE}?target_session_attrs=master", "target_session_attrs 'master' is not one of any, primary"),
    (f"{BASE}?keepalives_idle=1m", "keepalives_idle '1m' is not a whole number"),
])
def test_check_refuses_what_cannot_be_honoured(dsn: str, problem: str) -> None:
    (found,) = parameter_problems(dsn)
    assert found.startswith(problem), found


def test_check_says_it_in_one_line_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[sources]]\nname = "a"\ndsn = "host=db1 password=s3cret hostaddr=10.0.0.1"\n'
                      '[[sinks]]\ntype = "jsonfile"\npath = "out.ndjson"\n')
    done = subprocess.run([*REAPER, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{config}: sources[0].dsn: hostaddr=10.0.0.1 is not supported: put the address in the host part of the dsn"]


@pytest.mark.pg
def test_a_source_with_libpqs_client_parameters_collects(pg15, tmp_path: Path) -> None:
    params = ("connect_timeout=5&keepalives=1&keepalives_idle=30&tcp_user_timeout=9000&sslcompression=0"
              "&fallback_application_name=psql&gssencmode=disable&target_session_attrs=read-write")
    config = tmp_path / "c.toml"
    config.write_text(f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn()}?{params}"\npreset = "basic"\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n')
    done = subprocess.run([*REAPER, "once", "--config", str(config), "--metric", "db_stats", "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert result["metric"] == "db_stats" and result["rows"], result


def keepalive_of(conn: db.SourceConnection) -> tuple[int, int, int, int, int]:
    sock = conn._conn._transport.get_extra_info("socket")
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            *(sock.getsockopt(socket.IPPROTO_TCP, o)
              for o in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, socket.TCP_USER_TIMEOUT)))


@pytest.mark.pg
@pytest.mark.parametrize(("params", "expected"), [
    # reaper's defaults: a probe after a minute idle, so a load balancer or NAT keeps the flow of a lane whose
    # metrics run hourly, and a silent peer is noticed in two minutes
    ("", (1, 60, 10, 6, 0)),
    ("?keepalives_idle=7&keepalives_interval=2&keepalives_count=3&tcp_user_timeout=9000", (1, 7, 2, 3, 9000)),
    ("?keepalives=0&tcp_user_timeout=5000", (0, None, None, None, 5000)),  # (None: the system's, not ours)
])
async def test_tcp_keepalives_are_on_and_as_the_dsn_says(pg15, params: str, expected: tuple[int | None, ...]) -> None:
    async with db.open_loop():
        with trio.fail_after(30):
            conn = await db.open_source_connection(pg15.dsn() + params, statement_timeout_seconds=10)
        try:
            found = keepalive_of(conn)
            assert [f for f, e in zip(found, expected, strict=True) if e is not None] == [
                e for e in expected if e is not None]
            assert (await conn.fetch("select 1 as one")) == [{"one": 1}]
        finally:
            await conn.close()
