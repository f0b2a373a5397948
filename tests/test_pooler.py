"""A `postgres` source monitored through PgBouncer, as the applications reach the server (reaper.db.pooler).

PgBouncer's defaults refused every startup setting reaper sent ("unsupported startup parameter"): the source
was down for ever. Told to ignore them, transaction pooling handed reaper's statements to server sessions
where its prepared statements did not exist (errors every few ticks) and kept the statement_timeout reaper
set as a session setting for the pooler's other clients. From outside: the real daemon, a real PgBouncer in
transaction mode with ONE server session for three sources, a metric past its own timeout.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from kinds_programs import Program, start_pooler
from pgserver import ServerHandle
from test_daemon import Daemon, wait_until

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]
SLEEPY = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, 1 as v from pg_sleep(5)"
# what reaper asks at startup; a DBA who read "unsupported startup parameter" lists them to be ignored
REAPERS_SETTINGS = "default_transaction_read_only, statement_timeout, jit, plan_cache_mode, lock_timeout, search_path"


@pytest.fixture(params=["refuses", "ignores"])
def pooler(request: pytest.FixtureRequest, pg15: ServerHandle) -> Iterator[Program]:
    """PgBouncer as shipped (refuses reaper's startup settings) or told to ignore them (drops them)."""
    prog = start_pooler(pg15, ignore_startup_parameters=REAPERS_SETTINGS if request.param == "ignores" else "")
    yield prog
    prog.stop()


def through(prog: Program, dbname: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{prog.port}/{dbname}"


async def session_settings(dsn: str) -> tuple[str, str, str]:
    """What a client of the pooler finds in the (one) server session: its statement_timeout, read-only default
    and search_path."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        row = await conn.fetchrow("select current_setting('statement_timeout') as st,"
                                  " current_setting('default_transaction_read_only') as ro,"
                                  " current_setting('search_path') as sp")
        return row["st"], row["ro"], row["sp"]
    finally:
        await conn.close()


def test_sources_behind_a_transaction_pooler_collect_and_leave_nothing_in_its_sessions(
        pooler: Program, fresh_db: str, tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    dsn = through(pooler, fresh_db)
    d.write_config([(name, dsn, 1) for name in ("a", "b", "c")],
                   f'\n[metrics.sleepy]\ndescription = "past its timeout"\ngauges = ["*"]\n'
                   f'statement_timeout_seconds = 1\n[metrics.sleepy.sql]\n14 = "{SLEEPY}"\n')
    text = d.config.read_text().replace('metrics = { ping = 1 }\n', 'metrics = { ping = 1, sleepy = 2 }\n', 1)
    d.config.write_text(text)
    d.start()
    try:
        wait_until(lambda: all(len(d.times(s)) >= 8 for s in "abc"), 90, "eight pings of each source through it")
        wait_until(lambda: "metric sleepy: failed" in d.log_text(), 60, "the sleepy metric's timeout")
        status = d.fresh_status()
    finally:
        assert d.stop() == 0
    log = d.log_text()
    assert "prepared statement" not in log and "unsupported startup parameter" not in log, log
    assert ": down" not in log, log
    errors = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
    assert errors and all("metric sleepy: failed: canceling statement due to statement timeout" in line
                          for line in errors), errors
    assert {s.name: s.status for s in status.sources} == {"a": "up", "b": "up", "c": "up"}
    # reaper's statement timeouts (8 s by default, 1 s for sleepy) were its own, never the session's; nor did it
    # pin the session's search_path
    assert asyncio.run(session_settings(dsn)) == ("0", "off", '"$user", public')
    assert "through a connection pooler" in log  # said when each source connected


def test_check_connect_says_the_source_is_behind_a_pooler(pooler: Program, fresh_db: str, tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(f'[[sources]]\nname = "app"\ndsn = "{through(pooler, fresh_db)}"\npreset = "basic"\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n')
    done = subprocess.run([*REAPER, "check", "--connect", "--config", str(config), "--format", "table"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("app: reachable, PostgreSQL 15") and "through a connection pooler" in first, first
    # (the test's role is a superuser: names in the metrics resolve in the pooled session's search_path)
    assert "a superuser through a pooler runs the metrics under the server session's own search_path" in first


def test_a_storage_behind_a_refusing_pooler_is_told_what_to_do(pg15: ServerHandle, fresh_db: str,
                                                               tmp_path: Path) -> None:
    """The storage keeps session state (locks, prepared COPY targets): it cannot go pooled like a source, so
    `check --connect` says what to change instead of only PgBouncer's bare refusal."""
    prog = start_pooler(pg15)
    try:
        config = tmp_path / "reaper.toml"
        config.write_text(f'[[sources]]\nname = "app"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\npreset = "basic"\n'
                          f'[[sinks]]\ntype = "postgres"\ndsn = "{through(prog, fresh_db)}"\n')
        done = subprocess.run([*REAPER, "check", "--connect", "--config", str(config), "--format", "table"],
                              capture_output=True, text=True, timeout=120)
    finally:
        prog.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    sink = next(line for line in done.stdout.splitlines() if line.startswith("sink postgres:"))
    assert "unreachable: unsupported startup parameter" in sink and "point this dsn at the server itself" in sink
