"""A source's slow and local lanes hold no task while they have no work (issue 14: few tasks per source),
under trio's MockClock with the scripted fake database (tests/fakes.py).

`Lane.offer` starts the lane's serving task when none runs and the task ends when its queue is empty;
the slow lane's connection stays open between runs (closed after idle_seconds by the fast lane's tick,
tests/test_lanes.py), the local lane's collectors run over it, and stopping the source mid-job closes it.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel
from fakes import FakeConnector, catalog, source, sql_metric

import reaper.daemon.source
from reaper.config.schema import MetricDef
from reaper.daemon.lanes import Lane, LeasedLink
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement
from reaper.special import SpecialContext, SpecialSpec
from reaper.special.facts import FACTS_SQL, prime_facts, server_facts


def lane_tasks() -> list[str]:
    """The names of the lanes' tasks running now (every task of the run, walked from the root)."""
    names: list[str] = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return [name for name in names if ".Lane." in name]


async def sample_lane_tasks(seconds: float, every: float = 0.1) -> list[int]:
    counts = []
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        counts.append(len(lane_tasks()))
        await trio.sleep(every)
    return counts


def host_collector(monkeypatch: pytest.MonkeyPatch, handler: Any) -> MetricDef:
    """A special metric `host` that runs `handler` as a local (host) collector with a 5 s deadline."""
    spec = SpecialSpec(handler, local_only=True, deadline_seconds=5.0)
    monkeypatch.setattr(reaper.daemon.source, "special_spec", lambda name: spec if name == "host" else None)
    return MetricDef(name="host", description="host", special=True)


async def test_a_source_without_lane_work_runs_no_lane_task(autojump_clock) -> None:
    connector = FakeConnector()
    reaper = SourceReaper(source(metrics={"fast": 1}), catalog(sql_metric("fast")), lambda m: None,
                          connector=connector)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        counts = await sample_lane_tasks(30)
        assert reaper.slow is not None and reaper.local is not None  # the lanes exist...
        n.cancel_scope.cancel()
    assert max(counts) == 0  # ...but hold no task
    assert len(connector.conn.requests) >= 29 and not connector.others


async def test_a_lanes_task_lives_only_while_it_has_work_and_keeps_its_connection(autojump_clock) -> None:
    connector = FakeConnector()
    connector.conn.slow["slow"] = 1.0  # runs 1 s every 10 s
    cat = catalog(sql_metric("fast"), sql_metric("slow", statement_timeout_seconds=5.0))
    reaper = SourceReaper(source(metrics={"fast": 1, "slow": 10}), cat, lambda m: None, connector=connector)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        counts = await sample_lane_tasks(100)
        assert reaper.slow is not None
        runs = reaper.slow.state.runs
        n.cancel_scope.cancel()
    assert max(counts) == 1  # one task while a job runs...
    assert counts.count(0) >= 0.8 * len(counts)  # ...none the other 9 s of every 10
    assert runs >= 9 and len(connector.others) == 1  # every run on the one slow connection, kept between runs
    assert connector.others[0].closed  # closed when the source stopped


async def test_stopping_a_source_mid_job_ends_the_lane_task_and_closes_its_connection(autojump_clock) -> None:
    connector = FakeConnector()
    connector.conn.slow["slow"] = 30.0
    cat = catalog(sql_metric("fast"), sql_metric("slow", statement_timeout_seconds=60.0))
    reaper = SourceReaper(source(metrics={"fast": 1, "slow": 60}), cat, lambda m: None, connector=connector)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            n.start_soon(reaper.run)
            while not connector.others or not connector.others[0].runs:
                await trio.sleep(0.5)
            assert len(lane_tasks()) == 1
            scope.cancel()
    assert lane_tasks() == []
    assert connector.others[0].closed and connector.open_connections() == 0
    assert reaper.slow is None and reaper.local is None


async def test_a_local_collector_runs_over_the_slow_lanes_connection_in_a_task_of_its_own(
        autojump_clock, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []  # the task of each run

    async def host_figures(ctx: SpecialContext) -> list[tuple[str | None, list[dict[str, Any]]]]:
        seen.append(trio.lowlevel.current_task().name)
        rows = await ctx.conn.fetch("select 1")  # a server fact, through the slow lane's connection
        await trio.sleep(0.5)  # reading the host
        return [(None, [{"epoch_ns": 1, "host": rows[0]["bytes"]}])]

    host = host_collector(monkeypatch, host_figures)
    got: list[Measurement] = []
    connector = FakeConnector()
    src = SourceReaper(source(metrics={"fast": 1, "host": 5}), catalog(sql_metric("fast"), host), got.append,
                       connector=connector)
    async with trio.open_nursery() as n:
        await n.start(src.run)
        counts = await sample_lane_tasks(60)
        assert src.slow is not None and src.local is not None
        slow, local, connected = src.slow.state, src.local.state, src.slow.state.connected
        n.cancel_scope.cancel()
    assert len(seen) >= 11 and all(".Lane." in task for task in seen)
    assert sum(m.metric == "host" for m in got) == len(seen)
    assert len(connector.others) == 1 and connector.others[0].fetches.count("select 1") == len(seen)
    assert local.runs == len(seen) and slow.runs == 0  # run by the local lane...
    assert connector.others[0].fetches.count(FACTS_SQL) == 1  # read first on the new connection, once
    assert slow.statements_total == len(seen) + 1 and connected  # ...counted on the slow lane's connection
    assert max(counts) == 1 and counts.count(0) >= 0.8 * len(counts)  # a task only while it runs


async def test_a_local_collector_past_its_deadline_leaves_the_slow_lanes_statement_alone(
        autojump_clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host collector waiting for the slow lane's connection (busy with a 30 s metric) times out: it fails
    alone. Its statement never started, so the slow lane's connection and the metric running on it are kept
    (dropping them cut a healthy metric's run: 'connection lost', a reconnect)."""

    async def host_figures(ctx: SpecialContext) -> list[tuple[str | None, list[dict[str, Any]]]]:
        await trio.sleep(1)  # reading the host; meanwhile the slow metric takes the connection
        rows = await ctx.conn.fetch("select 1")
        return [(None, [{"epoch_ns": 1, "host": rows[0]["bytes"]}])]

    host = host_collector(monkeypatch, host_figures)
    got: list[Measurement] = []
    connector = FakeConnector()
    connector.conn.slow["slow"] = 30.0
    cat = catalog(sql_metric("fast"), sql_metric("slow", statement_timeout_seconds=60.0), host)
    src = SourceReaper(source(metrics={"fast": 1, "slow": 100, "host": 100}), cat, got.append, connector=connector)
    async with trio.open_nursery() as n:
        await n.start(src.run)
        await trio.sleep(40)
        assert src.slow is not None
        slow_connection_kept = len(connector.others) == 1 and not connector.others[0].closed
        errors, degraded = src.state.metric_errors, set(src.state.degraded)
        n.cancel_scope.cancel()
    assert sum(m.metric == "slow" for m in got) == 1  # the slow metric's run delivered...
    assert slow_connection_kept  # ...on its connection, never dropped under it
    assert not any(m.metric == "host" for m in got) and errors == 1 and "host" in degraded  # the collector failed alone


async def test_a_local_collector_cut_off_mid_statement_drops_the_connection_it_used(
        autojump_clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side: a host collector whose statement is still running at its deadline leaves the
    connection in an unknown state, so the slow lane drops it and its next job connects again."""

    async def host_figures(ctx: SpecialContext) -> list[tuple[str | None, list[dict[str, Any]]]]:
        rows = await ctx.conn.fetch("select hangs")
        return [(None, [{"epoch_ns": 1, "host": rows[0]["bytes"]}])]

    host = host_collector(monkeypatch, host_figures)
    connector = FakeConnector()
    connector.conn.slow["select hangs"] = 30.0
    src = SourceReaper(source(metrics={"fast": 1, "host": 100}), catalog(sql_metric("fast"), host),
                       lambda m: None, connector=connector)
    async with trio.open_nursery() as n:
        await n.start(src.run)
        await trio.sleep(10)
        dropped = len(connector.others) == 1 and connector.others[0].closed
        n.cancel_scope.cancel()
    assert dropped and src.state.metric_errors == 1


async def test_a_local_collectors_first_facts_do_not_wait_behind_the_slow_metric_on_a_new_connection(
        autojump_clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slow lane opens its connection (2 s) for a 30 s metric; a host collector asks for its server facts
    meanwhile. The facts are read on the new connection before the slow metric takes it, and the collector
    waits for the opening only, not for the statement after it (it waited 30 s and failed at its 5 s deadline)."""

    async def host_figures(ctx: SpecialContext) -> list[tuple[str | None, list[dict[str, Any]]]]:
        await trio.sleep(0.5)  # reading the host; meanwhile the slow lane is opening its connection
        facts = await server_facts(ctx)
        return [(None, [{"epoch_ns": 1, "data_directory": facts.data_directory}])]

    host = host_collector(monkeypatch, host_figures)
    got: list[Measurement] = []
    connector = FakeConnector(seconds=2.0)
    connector.conn.slow["slow"] = 30.0
    cat = catalog(sql_metric("fast"), sql_metric("slow", statement_timeout_seconds=60.0), host)
    src = SourceReaper(source(metrics={"fast": 1, "slow": 100, "host": 100}), cat, got.append, connector=connector)
    async with trio.open_nursery() as n:
        await n.start(src.run)
        with trio.fail_after(10):
            while not any(m.metric == "host" for m in got):
                await trio.sleep(0.1)
        delivered_at = trio.current_time()
        assert not any(m.metric == "slow" for m in got)  # the slow metric still runs
        await trio.sleep(40)
        n.cancel_scope.cancel()
    assert delivered_at < 6  # connect (2 s), the first tick, the slow lane's connect (2 s): not 30 s later
    assert src.state.metric_errors == 0 and sum(m.metric == "slow" for m in got) == 1
    assert len(connector.others) == 1 and connector.others[0].fetches.count(FACTS_SQL) == 1  # read once, first


class OpeningOwner:
    """A LaneOwner whose connections take 2 s to open and read their server facts first."""

    name = "src"

    def __init__(self) -> None:
        self.connector = FakeConnector(seconds=2.0)

    async def open_link(self) -> Any:
        return await self.connector(source())

    async def link_opened(self, link: Any) -> None:
        await prime_facts(link, 5.0)


async def test_a_lease_waits_for_the_connection_to_open_never_for_the_statement_lock(autojump_clock) -> None:
    """The slow lane holds its lock from before it opens its connection until its statement is done; a local
    collector asking for the connection meanwhile gets it (with its facts) once open, whichever task got to
    open it first."""
    owner = OpeningOwner()
    lane = Lane("slow", owner)  # type: ignore[arg-type]
    ready_at: list[float] = []

    async def collector() -> None:
        await LeasedLink(lane).ready()
        ready_at.append(trio.current_time())

    # the slow lane's job: the lock first, the connection next, then 30 s of statement
    async with trio.open_nursery() as n, lane.lock:
        n.start_soon(collector)
        await trio.sleep(0.5)
        await lane.ensure_link()
        await trio.sleep(30)
    assert ready_at == [2.0]  # the open the collector started (the slow lane's waited for it): not 30 s later
    assert len(owner.connector.others) == 0 and owner.connector.conn.fetches == [FACTS_SQL]  # one connection


async def test_the_slow_lanes_connection_says_nothing_of_instance_up(autojump_clock, caplog) -> None:
    """instance_up is the tick's own (no collector of its own): a slow lane's new connection, which looks for the
    source's host collectors, said "metric instance_up is not collected by this version of reaper; skipped"."""
    connector = FakeConnector()
    cat = catalog(sql_metric("fast"), sql_metric("slow", statement_timeout_seconds=5.0))
    reaper = SourceReaper(source(metrics={"fast": 1, "slow": 10, "instance_up": 1}), cat, lambda m: None,
                          connector=connector)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        while reaper.slow is None or not reaper.slow.state.runs:
            await trio.sleep(0.5)
        n.cancel_scope.cancel()
    assert connector.others  # the slow lane connected
    assert not [r.getMessage() for r in caplog.records if "instance_up" in r.getMessage()]
