"""A source's lanes under trio's MockClock with a scripted fake database (tests/fakes.py).

The fast lane sends one statement per tick and never waits for the slow lane; the slow lane skips a
metric that is still running when it comes due again (counted), and closes its connection when idle;
a source never holds more than two connections; a source that goes down says instance_up = 0 at once;
a cached instance-level result is never delivered twice to one source.
"""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from fakes import FakeConnector, catalog, source, sql_metric

from reaper.config.schema import MetricDef
from reaper.daemon.cache import InstanceCache
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

SLOW_SECONDS = 3.0  # the slow metric's run time, longer than its own interval (2 s)


def slow_source() -> tuple[SourceReaper, list[Measurement], FakeConnector]:
    got: list[Measurement] = []
    connector = FakeConnector()
    connector.conn.slow["slow"] = SLOW_SECONDS
    cat = catalog(sql_metric("fast"), sql_metric("slow", statement_timeout_seconds=5.0))
    reaper = SourceReaper(source(metrics={"fast": 1, "slow": 2}), cat, got.append, connector=connector)
    return reaper, got, connector


async def test_a_slow_metric_never_delays_the_fast_lanes_ticks(autojump_clock) -> None:
    reaper, got, connector = slow_source()
    most_connections = 0
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        deadline = trio.current_time() + 60
        while trio.current_time() < deadline:
            most_connections = max(most_connections, connector.open_connections())
            await trio.sleep(0.25)
        n.cancel_scope.cancel()
    ticks = [t for t, _ in connector.conn.requests]
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) >= 58 and max(gaps) == pytest.approx(1.0)  # every second, on the grid, for the whole minute
    assert all(list(r.batch) == ["fast"] and not r.solo and not r.timed for _, r in connector.conn.requests)
    assert [m.metric for m in got].count("fast") == len(ticks)
    slow_runs = connector.others[0].runs
    assert slow_runs and all(name == "slow" for _, name in slow_runs)
    assert most_connections == 2


async def test_a_slow_lane_still_busy_skips_the_run_and_counts_it(autojump_clock) -> None:
    reaper, _got, connector = slow_source()
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(30)
        status = reaper.status()
        n.cancel_scope.cancel()
    slow = {lane.name: lane for lane in status.lanes}["slow"]
    runs = [t for t, _ in connector.others[0].runs]
    # due every 2 s, running 3 s: every other due run finds it busy, none queues up behind it
    assert all(b - a >= SLOW_SECONDS for a, b in itertools.pairwise(runs))
    assert slow.skipped >= len(runs) - 2 and slow.skipped > 0
    assert slow.runs == len(runs) and len(runs) - 1 <= slow.statements_total <= len(runs)  # the last may run
    fast = {lane.name: lane for lane in status.lanes}["fast"]
    assert fast.statements_last_run == 1 and fast.statements_total == fast.runs


async def test_an_idle_slow_lane_closes_its_connection(autojump_clock) -> None:
    reaper, _got, connector = slow_source()
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        while not connector.others:
            await trio.sleep(0.5)
        reaper.update(source(metrics={"fast": 1}), reaper.catalog)  # no slow work any more
        opened = trio.current_time()
        while not connector.others[0].closed:
            await trio.sleep(1)
        closed_after = trio.current_time() - opened
        assert not connector.conn.closed  # the fast lane's connection stays
        n.cancel_scope.cancel()
    assert 60 <= closed_after <= 60 + SLOW_SECONDS + 2  # idle for max(60 s, 2 x its longest interval)
    assert [lane.name for lane in reaper.status().lanes] == ["fast"]  # the other lanes end with the source


async def test_a_source_that_goes_down_says_instance_up_0_at_once(autojump_clock) -> None:
    got: list[Measurement] = []
    connector = FakeConnector()
    reaper = SourceReaper(source(metrics={"a": 1, "instance_up": 60}), catalog(sql_metric("a")), got.append,
                          connector=connector)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(10)  # instance_up (60 s) is not due again for a while
        connector.conn.broken = connector.down = True
        broke = trio.current_time()
        while reaper.state.status != "down":
            await trio.sleep(0.1)
        noticed = trio.current_time()
        await trio.sleep(5)
        n.cancel_scope.cancel()
    ups = [m.rows[0]["instance_up"] for m in got if m.metric == "instance_up"]
    assert ups == [1, 0]  # one 1 at the start, one 0 at the outage, nothing doubled
    assert noticed - broke <= 1.0


async def test_a_cached_instance_result_reaches_each_source_once(autojump_clock) -> None:
    shared = MetricDef(name="shared", description="x", instance_level=True, sql={14: "select 1 as shared"})
    cache = InstanceCache(max_age=30)
    got: list[Measurement] = []
    connectors = [FakeConnector() for _ in range(2)]
    for c in connectors:
        c.conn.latency = 0.1  # rows are fetched a little after the tick: the cached entry is then < 2 s old
    reapers = [SourceReaper(source(name, metrics={"shared": 2}), catalog(shared), got.append, connector=c,
                            instance_cache=cache) for name, c in zip(("one", "two"), connectors, strict=True)]
    async with trio.open_nursery() as n:
        for r in reapers:
            await n.start(r.run)
        await trio.sleep(40)
        n.cancel_scope.cancel()
    for name in ("one", "two"):
        stamps = [m.rows[0]["epoch_ns"] for m in got if m.source == name]
        assert len(stamps) == len(set(stamps))  # never the same sample twice
        assert len(stamps) >= 19  # one per due tick: a hit does not cost the source its sample
    fetched = sum("shared" in r.batch for c in connectors for _, r in c.conn.requests)
    assert cache.hits > 0 and fetched + cache.hits == len(got)  # each delivery a fetch or a hit, not both
