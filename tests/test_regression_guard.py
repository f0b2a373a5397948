"""Regression guards for reaper's cost that need no timing (issue 14 Build 6): counted, not timed.

- A source with the `debug` preset on a real PostgreSQL 15: every fast-lane tick is ONE trio-asyncio
  crossing and ONE statement; the slow lane's work (special metrics that talk to the server) costs at
  most one crossing per job.
- A metric with its own statement_timeout_seconds in the slow lane: the session keeps that timeout, so its
  second run on the same link sends ONE statement (the link's counter and pg_stat_statements agree: one
  set_config in all), not BEGIN / set_config / the statement / COMMIT.
- The modules a real `reaper run` imports for a jsonfile-only config (`python -X importtime`, which
  reports every import as it happens, start-up and first ticks alike): none of the optional stacks
  (the Prometheus sink's HTTP server, psycopg, httpx, yaml, rich, psutil without OS metrics, matplotlib).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from test_collect_pg import wait_for
from test_daemon import PING, REAPER, wait_until

import reaper.db
from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg

# top-level packages that only a configured feature may import
OPTIONAL = {"hypercorn", "prometheus_client", "psycopg", "httpx", "yaml", "rich", "psutil", "matplotlib",
            "h11", "h2", "httpcore", "tomli_w", "difflib",
            "pytest", "_pytest"}  # trio.testing imports pytest when it is installed (reaper.quiet avoids it)
# reaper's own modules that only a configured feature (or a CLI verb other than `run`) may import
OPTIONAL_REAPER = {"reaper.daemon.fleet", "reaper.db.fleet", "reaper.daemon.health", "reaper.catalog.pgwatch",
                   "reaper.db.configdb", "reaper.sinks.prometheus", "reaper.sinks.postgres", "reaper.db.storage"}


def _lane_of(task_name: str) -> str:
    if ".Lane." in task_name:
        return "lane"
    if "SourceReaper.run" in task_name:
        return "fast"
    return task_name


async def test_debug_preset_one_crossing_and_one_statement_per_fast_tick(pg15, fresh_db, monkeypatch) -> None:
    crossings: Counter[tuple[str, str]] = Counter()
    real = reaper.db.aio_as_trio

    def counting(fn: Callable[..., Awaitable[Any]]) -> Any:
        task = trio.lowlevel.current_task().name
        crossings[(_lane_of(task), getattr(fn, "__name__", repr(fn)))] += 1
        return real(fn)

    monkeypatch.setattr(reaper.db, "aio_as_trio", counting)
    catalog = Catalog.for_config()
    metrics = dict.fromkeys(catalog.presets["debug"].metrics, 2)  # the whole debug set, every 2 s
    src = SourceConfig(name="dbg", dsn=pg15.dsn(dbname=fresh_db), preset="debug", metrics=metrics)
    got: list[Measurement] = []
    source = SourceReaper(src, catalog, got.append)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(source.run)
        await wait_for(lambda: source.state.ticks >= 5 and source.slow is not None
                       and source.slow.state.runs >= 5, limit=60)
        await wait_for(lambda: source.state.statements_total == source.state.ticks, limit=10)
        ticks, fast_statements = source.state.ticks, source.state.statements_total
        fast = {fn: c for (lane, fn), c in crossings.items() if lane == "fast" and fn not in ("_connect", "close")}
        lane_runs = sum(lane.state.runs for lane in (source.slow, source.local) if lane is not None)
        lane_crossings = sum(c for (lane, fn), c in crossings.items() if lane == "lane" and fn != "_connect")
        n.cancel_scope.cancel()
    assert {m.metric for m in got} >= {"db_stats", "instance_up", "psutil_cpu"}
    assert fast_statements == ticks  # one statement per fast tick, specials' reads included
    assert fast == {"_run_tick": ticks}, fast  # and one crossing per tick, nothing else in the fast lane
    assert lane_crossings <= lane_runs, (crossings, lane_runs)  # at most one per job in the other lanes


PROBE = "select 42 as reaper_timed_probe"


def _calls(pg15: Any, dbname: str, *likes: str) -> int:
    """pg_stat_statements' calls of the statements in `dbname` whose text matches every LIKE pattern."""
    where = " ".join(f"and s.query ilike '{like}'" for like in likes)
    return int(pg15.psql("select coalesce(sum(calls), 0) from pg_stat_statements s join pg_database d on "
                         f"d.oid = s.dbid where d.datname = '{dbname}' {where}"))


async def test_a_timed_metric_sends_one_statement_per_run_once_its_timeout_is_set(pg15, fresh_db) -> None:
    shipped = Catalog.for_config()
    probe = MetricDef(name="probe", description="timed", sql={14: PROBE}, statement_timeout_seconds=5)
    catalog = Catalog(metrics={**shipped.metrics, "probe": probe}, presets=shipped.presets)
    src = SourceConfig(name="timed", dsn=pg15.dsn(dbname=fresh_db), metrics={"probe": 1})
    source = SourceReaper(src, catalog, lambda m: None)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(source.run)
        # three runs done: the first sets the timeout (2 statements), the next two send 1 each
        await wait_for(lambda: source.slow is not None and source.slow.state.statements_total >= 4, limit=30)
        assert source.slow is not None
        last, total, runs = (source.slow.state.statements_last_run, source.slow.state.statements_total,
                             source.slow.state.runs)
        n.cancel_scope.cancel()
    assert last == 1, (last, total, runs)
    probes = _calls(pg15, fresh_db, "%reaper_timed_probe%")
    sets = _calls(pg15, fresh_db, "select set_config(%", "%from (select set_config(%")
    assert probes >= 3 and sets == 1, (probes, sets)  # the server saw one set_config for all the runs
    assert _calls(pg15, fresh_db, "begin%") == 0  # and no transaction around them


def _imported_modules(stderr: str, *, top_level: bool = True) -> set[str]:
    """Module names (top-level package names by default) from `python -X importtime` lines
    ("import time: self | cumulative | name")."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0] if top_level else name)
    return names


@pytest.mark.timeout(120)
def test_reaper_run_with_a_jsonfile_sink_imports_no_optional_stack(pg15, fresh_db, tmp_path: Path) -> None:
    out, state = tmp_path / "out.ndjson", tmp_path / "state"
    config = tmp_path / "reaper.toml"
    config.write_text(
        f'[collector]\nstate_dir = "{state}"\n\n[[sinks]]\ntype = "jsonfile"\npath = "{out}"\n\n'
        f'[metrics.ping]\ndescription = "ping"\ngauges = ["*"]\n[metrics.ping.sql]\n14 = "{PING}"\n\n'
        f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\nmetrics = {{ ping = 1 }}\n')
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", *REAPER[1:], "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: proc.poll() is not None or (out.exists() and out.read_text().count("\n") >= 3),
                   limit=60, what="three ticks")
        assert proc.poll() is None, log.read_text()[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    modules = _imported_modules(log.read_text())
    assert {"reaper", "trio", "asyncpg", "trio_asyncio"} <= modules  # the parser read real importtime output
    assert not modules & OPTIONAL, sorted(modules & OPTIONAL)
    ours = _imported_modules(log.read_text(), top_level=False)
    assert not ours & OPTIONAL_REAPER, sorted(ours & OPTIONAL_REAPER)
