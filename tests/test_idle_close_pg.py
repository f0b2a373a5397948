"""A server that ends idle sessions (idle_session_timeout, set by a DBA for the applications' leaked sessions):
reaper's connection is closed between ticks. Every tick still delivers; the log says why once, not at every
tick for ever (it said "connected" at each one)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from test_daemon import Daemon, wait_until

pytestmark = pytest.mark.pg


def test_a_server_ending_idle_sessions_costs_no_tick_and_is_said_once(pg15, fresh_db: str, tmp_path: Path) -> None:
    pg15.psql(f"alter database {fresh_db} set idle_session_timeout = '1s'")
    d = Daemon(tmp_path)
    d.write_config([("a", pg15.dsn(dbname=fresh_db), 3)])
    d.start()
    try:
        wait_until(lambda: len(d.times("a")) >= 5, 60, "five pings, each after the server closed the connection")
    finally:
        assert d.stop() == 0
    log = d.log_text()
    assert log.count("connected again") == 1, log
    (line,) = [x for x in log.splitlines() if "connected again" in x]
    assert "INFO" in line and "idle_session_timeout" in line and "1s" in line, line
    assert "ERROR" not in log and "WARNING" not in log and ": down" not in log, log
    times = d.times("a")
    assert all(1.5 < b - a < 5.5 for a, b in itertools.pairwise(times)), times  # every 3 s tick delivered
