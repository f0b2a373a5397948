"""A source's connection found closed before a tick, and made again: said so the operator can tell why.

- A server that ends idle sessions (idle_session_timeout, set by a DBA for the applications' leaked sessions)
  closes reaper's connection between ticks: every tick still delivers; the log says why once, not at every
  tick for ever (it said "connected" at each one).
- A failover (a multi-host dsn with target_session_attrs=read-write) or a restart between two ticks is said
  every time, naming the new server: those must never fall under the once-only line."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pgserver import PgServer
from test_daemon import Daemon, wait_until
from test_lanes_pg import metric_toml

pytestmark = pytest.mark.pg


def test_a_server_ending_idle_sessions_costs_no_tick_and_is_said_once(pg15, fresh_db: str, tmp_path: Path) -> None:
    pg15.psql(f"alter database {fresh_db} set idle_session_timeout = '1s'")
    d = Daemon(tmp_path)
    # and a metric with a timeout of its own: it runs in the slow lane, on a second connection closed alike
    d.write_config([("a", pg15.dsn(dbname=fresh_db), 3)], metric_toml("timed", "slow lane", "2 as v", timeout=2))
    d.config.write_text(d.config.read_text().replace("metrics = { ping = 3 }", "metrics = { ping = 3, timed = 3 }"))
    d.start()
    try:
        wait_until(lambda: len(d.times("a")) >= 5 and sum(x["metric"] == "timed" for x in d.lines()) >= 5, 60,
                   "five pings and five timed rows, each after the server closed the connections")
    finally:
        assert d.stop() == 0
    log = d.log_text()
    assert log.count("connected again") == 1, log
    assert log.count("slow lane connected") == 1, log
    (line,) = [x for x in log.splitlines() if "connected again" in x]
    assert "INFO" in line and "idle_session_timeout" in line and "1s" in line, line
    assert "ERROR" not in log and "WARNING" not in log and ": down" not in log, log
    times = [x["data"][0]["epoch_ns"] / 1e9 for x in d.lines() if x["metric"] == "ping"]
    assert all(1.5 < b - a < 5.5 for a, b in itertools.pairwise(times)), times  # every 3 s tick delivered


def test_a_failover_and_a_restart_are_said_each_time(tmp_path: Path) -> None:
    with PgServer.create(major=15) as primary:
        replica = PgServer.create_replica(primary)
        try:
            d = Daemon(tmp_path)
            dsn = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{replica.port}/postgres"
                   "?target_session_attrs=read-write")
            d.write_config([("ha", dsn, 3)])
            d.start()
            try:
                wait_until(lambda: len(d.times("ha")) >= 2, 30, "two pings from the primary")
                primary.stop()
                replica.promote()
                wait_until(lambda: "ha: connected again, to" in d.log_text() or "ha: up again" in d.log_text(), 30,
                           "the source back after the failover")
                seen = len(d.times("ha"))
                wait_until(lambda: len(d.times("ha")) >= seen + 2, 30, "two pings from the new primary")
                replica.stop()
                replica.start()
                wait_until(lambda: len(d.times("ha")) >= seen + 4, 60, "two pings after its restart")
            finally:
                assert d.stop() == 0
        finally:
            replica.cleanup()
    back = [line for line in d.log_text().splitlines()
            if "ha: connected again, to" in line or "ha: up again" in line]
    assert len(back) == 2, d.log_text()  # each said at INFO (or WARNING after an outage), never at debug level
    assert all(" INFO " in line or " WARNING " in line for line in back), back
    assert f"127.0.0.1:{replica.port} (was 127.0.0.1:{primary.port})" in back[0] or "up again" in back[0], back
