"""The lanes against a real PostgreSQL 15: a real `reaper run` process with a slow metric, and the
fast lane's one statement per tick counted by pg_stat_statements (issue 11's acceptance)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_collect_pg import wait_for
from test_daemon import Daemon, max_gap, wait_until

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg
DURATION_SECONDS = 20.0  # the acceptance says 60 s; 20 s keeps CI short
EPOCH = "(extract(epoch from now()) * 1e9)::int8 as epoch_ns"


def metric_toml(name: str, description: str, select: str, *, timeout: float | None = None) -> str:
    """A config's [metrics.NAME] table: `select` follows the epoch_ns column; every column a gauge."""
    own = f"statement_timeout_seconds = {timeout:g}\n" if timeout is not None else ""
    return (f'\n[metrics.{name}]\ndescription = "{description}"\ngauges = ["*"]\n{own}'
            f'[metrics.{name}.sql]\n14 = "select {EPOCH}, {select}"\n')


SLOW_METRIC = metric_toml("slow", "sleeps 3 s, past its own 1 s statement timeout", "pg_sleep(3) is null as slept",
                          timeout=1)


@pytest.mark.timeout(120)
def test_a_slow_metric_never_delays_the_one_second_metric(pg15, fresh_db, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)], extra=SLOW_METRIC)
    daemon.config.write_text(daemon.config.read_text().replace("metrics = { ping = 1 }",
                                                               "metrics = { ping = 1, slow = 2 }"))
    try:
        daemon.start()
        wait_until(lambda: len(daemon.times("a")) >= 2, what="collection")
        began = daemon.times("a")[0]
        wait_until(lambda: daemon.times("a")[-1] - began >= DURATION_SECONDS, limit=DURATION_SECONDS + 30,
                   what=f"{DURATION_SECONDS:g}s of collection")
        status = daemon.fresh_status()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    times = daemon.times("a")
    assert max_gap(times) <= 1.5, max_gap(times)
    log = daemon.log_text()
    timeouts = [line for line in log.splitlines() if "metric slow" in line and "statement timeout" in line]
    assert len(timeouts) == 1, log  # reported once, not at every run
    lanes = {lane.name: lane for lane in status.sources[0].lanes}
    assert lanes["fast"].statements_last_run == 1
    slow = lanes["slow"]
    # the first run sets the session's timeout (set_config, then the statement); every later run sends the
    # statement alone, and the server still cancels it at 1 s
    assert slow.runs >= 2 and slow.statements_last_run == 1, slow
    assert slow.statements_total <= slow.runs + 1, slow


async def test_the_debug_preset_sends_one_statement_per_fast_tick(pg15, fresh_db) -> None:
    catalog = Catalog.for_config()
    metrics = dict.fromkeys(catalog.presets["debug"].metrics, 2)  # the debug set, every 2 s
    src = SourceConfig(name="dbg", dsn=pg15.dsn(dbname=fresh_db), preset="debug", metrics=metrics)
    got: list[Measurement] = []
    reaper = SourceReaper(src, catalog, got.append)
    lanes: dict[str, object] = {}
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        await wait_for(lambda: reaper.state.statements_total >= 6, limit=60)  # six ticks done
        lanes.update({lane.name: lane for lane in reaper.status().lanes})
        ticks = reaper.state.ticks
        n.cancel_scope.cancel()
    assert {m.metric for m in got} & {"change_events", "psutil_cpu", "instance_up", "db_stats"}
    # a tick's combined statement holds every due metric of the debug set (dozens: m0, m1, ... m40...);
    # change_events' own combined statement in the slow lane holds five (m0..m4), so "as m5" tells them apart
    combined = int(pg15.psql(
        "select coalesce(sum(calls), 0) from pg_stat_statements s join pg_database d on d.oid = s.dbid "
        f"where d.datname = '{fresh_db}' and s.query like 'select pg_is_in_recovery()%' "
        "and s.query like '% as m5%'"))
    fast = lanes["fast"]
    # every fast-lane statement was a tick's combined statement, one per tick (specials included)
    assert combined == fast.statements_total == ticks, (combined, fast)
    assert lanes["slow"].statements_total > 0  # change_events, the OS metrics' server reads: counted apart


TIMED_METRIC = metric_toml("timed", "a metric with its own timeout: the slow lane runs it", "1 as v", timeout=5)


@pytest.mark.timeout(120)
def test_a_role_allowed_one_connection_keeps_the_fast_lane_and_says_once_why_the_slow_one_waits(
        pg15, fresh_db, tmp_path: Path) -> None:
    """A DBA's `connection limit 1` on reaper's role: the fast lane collects, the slow lane (timed metrics) and
    the local one (OS metrics, whose server facts it reads) cannot connect. One line says so, and status
    shows why; the local lane's metrics used to add a 'connection lost' line each at every run."""
    role = f"reaper_one_{tmp_path.name[-12:].replace('-', '_')}".lower()
    pg15.psql(f"create role {role} login connection limit 1 in role pg_monitor")
    daemon = Daemon(tmp_path)
    daemon.write_config([("a", pg15.dsn(user=role, dbname=fresh_db), 1)], extra=TIMED_METRIC)
    daemon.config.write_text(daemon.config.read_text().replace(
        "metrics = { ping = 1 }", "metrics = { ping = 1, timed = 1, psutil_mem = 1 }"))
    try:
        daemon.start()
        wait_until(lambda: len(daemon.times("a")) >= 6, limit=60, what="six pings")
        status = daemon.fresh_status()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        pg15.psql(f"drop role if exists {role}")
    (slow,) = [lane for lane in status.sources[0].lanes if lane.name == "slow"]
    assert not slow.connected and "too many connections for role" in (slow.error or ""), slow
    log = daemon.log_text()
    assert log.count("slow lane: cannot connect (too many connections for role") == 1, log
    assert "connection lost" not in log, log


LOCKED_METRIC = metric_toml("app_rows", "rows of an application's table, which a migration locks",
                            "count(*) as n from app_table")
LOCK_SECONDS = 12


@pytest.mark.timeout(120)
def test_a_metric_waiting_for_a_table_lock_holds_the_fast_lane_at_most_its_lock_timeout(
        pg15, fresh_db, tmp_path: Path) -> None:
    """A migration holds an ACCESS EXCLUSIVE lock on a table a custom metric reads: the tick's one statement
    waited for it, and every fast metric with it, for the whole query timeout (30 s). With lock_timeout (1 s by
    default) the metric fails alone, is said once, and runs in the slow lane until the lock is gone."""
    import threading

    pg15.psql("create table app_table (id int); insert into app_table values (1)", dbname=fresh_db)
    daemon = Daemon(tmp_path)
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)], extra=LOCKED_METRIC)
    daemon.config.write_text(daemon.config.read_text().replace("metrics = { ping = 1 }",
                                                               "metrics = { ping = 1, app_rows = 2 }"))
    holder = threading.Thread(target=pg15.psql, kwargs={
        "sql": f"begin; lock table app_table in access exclusive mode; select pg_sleep({LOCK_SECONDS}); commit",
        "dbname": fresh_db})
    try:
        daemon.start()
        wait_until(lambda: len(daemon.times("a")) >= 3, limit=60, what="three pings")
        holder.start()
        wait_until(lambda: pg15.psql("select count(*) from pg_locks where relation = 'app_table'::regclass and "
                                     "mode = 'AccessExclusiveLock' and granted", dbname=fresh_db).strip() == "1",
                   limit=30, what="the migration's lock")
        locked_at = daemon.times("a")[-1]
        holder.join()
        wait_until(lambda: "metric app_rows: recovered" in daemon.log_text(), limit=60, what="app_rows back")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        holder.join()
    during = [t for t in daemon.times("a") if t >= locked_at]
    assert max_gap(during) < LOCK_SECONDS / 2, during  # the lock's 12 s held every ping before
    errors = [line for line in daemon.log_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "metric app_rows: failed: canceling statement due to lock timeout" in errors[0], errors


HEAVY_METRIC = metric_toml("heavy", "a heavy custom query with no timeout of its own", "1 as v from pg_sleep(2)")


@pytest.mark.timeout(120)
def test_a_metric_too_slow_for_the_batch_leaves_it_and_the_one_second_metric_keeps_its_samples(
        pg15, fresh_db, tmp_path: Path) -> None:
    """A custom query taking 2 s, with no statement_timeout_seconds of its own, rode in the tick's one statement:
    every 3 s the 1 s metric waited 2 s for it, for ever, without a word. Now its first run moves it to the slow
    lane (one WARNING), and the 1 s metric's samples stay a second apart while it goes on being collected."""
    daemon = Daemon(tmp_path)
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)], extra=HEAVY_METRIC)
    daemon.config.write_text(daemon.config.read_text().replace("metrics = { ping = 1 }",
                                                               "metrics = { ping = 1, heavy = 3 }"))

    def heavy_runs() -> int:
        return sum(1 for line in daemon.lines() if line["metric"] == "heavy")

    try:
        daemon.start()
        wait_until(lambda: "metric heavy took" in daemon.log_text(), limit=60, what="heavy leaving the batch")
        # the warning is said before that tick's rows reach the file
        wait_until(lambda: any(d["metric"] == "ping" for d in daemon.lines()), limit=30, what="the first ping")
        moved_at = max(d["data"][0]["epoch_ns"] / 1e9 for d in daemon.lines() if d["metric"] == "ping")
        runs = heavy_runs()
        wait_until(lambda: heavy_runs() >= runs + 3, limit=60, what="three more runs of heavy")
        status = daemon.fresh_status()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    pings = [d["data"][0]["epoch_ns"] / 1e9 for d in daemon.lines() if d["metric"] == "ping"]
    after = [t for t in pings if t > moved_at + 1]
    assert len(after) >= 5 and max_gap(after) <= 1.5, after  # a 3 s gap every 3 s before
    assert status.sources[0].slow == ("heavy",), status.sources[0]
    log = daemon.log_text()
    assert log.count("metric heavy took") == 1 and "ERROR" not in log, log
