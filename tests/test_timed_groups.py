"""Timed SQL jobs of one tick that share ONE statement in the slow lane (issue 14; reaper.daemon.jobs),
under MockClock with the scripted fake database: which metrics share, which run alone, and a group past
its client deadline. The combined statement itself is tested against PostgreSQL (test_timed_groups_pg.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from fakes import FakeConnector, catalog, source, sql_metric

from reaper import db
from reaper.daemon.jobs import GROUP_SHARE, Job, take_group
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement


def job(name: str, timeout: float = 10.0, wall_ns: int = 1) -> Job:
    return Job(sql_metric(name), wall_ns, 30.0, timeout + 5, query=db.SoloQuery("select 1", timeout))


def test_a_group_holds_its_ticks_cheap_jobs_under_the_same_timeout_within_the_share() -> None:
    shares = {"a": 0.01, "b": 0.02, "other_tick": 0.0, "other_timeout": 0.0, "heavy": GROUP_SHARE,
              "new": None, "fills": GROUP_SHARE - 0.04, "over": 0.02}
    queue = [job("b"), job("other_tick", wall_ns=2), job("other_timeout", timeout=20), job("heavy"), job("new"),
             job("fills"), job("over")]
    group = take_group(job("a"), queue, lambda j: shares[j.metric.name])
    assert [j.metric.name for j in group] == ["a", "b", "fills"]  # 0.01 + 0.02 + 0.06 < 0.1; "over" would pass it
    assert [j.metric.name for j in queue] == ["other_tick", "other_timeout", "heavy", "new", "over"]
    for alone in ("heavy", "new"):  # its own last run too expensive, or no history
        assert take_group(job(alone), [job("b")], lambda j: shares[j.metric.name]) == [job(alone)]


@asynccontextmanager
async def grouping(got: list[Measurement] | None = None) -> AsyncIterator[tuple[SourceReaper, FakeConnector]]:
    """A running timed source (`timed_source`) whose slow lane has run its first group; stopped on exit."""
    connector = FakeConnector()
    reaper = timed_source(connector, [] if got is None else got)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        while not connector.others or not connector.others[0].requests:
            await trio.sleep(1)
        yield reaper, connector
        n.cancel_scope.cancel()


def timed_source(connector: FakeConnector, got: list[Measurement]) -> SourceReaper:
    cat = catalog(sql_metric("fast"), *(sql_metric(n, statement_timeout_seconds=5.0) for n in ("a", "b", "heavy")))
    connector.conn.slow["heavy"] = 1.0  # alone: 20 % of its timeout
    return SourceReaper(source(metrics={"fast": 10, "a": 10, "b": 10, "heavy": 10}), cat, got.append,
                        connector=connector)


async def test_cheap_timed_metrics_share_a_statement_after_running_alone_once(autojump_clock) -> None:
    connector = FakeConnector()
    got: list[Measurement] = []
    reaper = timed_source(connector, got)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(45)
        lanes = {lane.name: lane for lane in reaper.status().lanes}
        n.cancel_scope.cancel()
    link = connector.others[0]
    alone = [name for _, name in link.runs]
    groups = [sorted(r.timed) for _, r in link.requests]
    ticks = len(connector.conn.requests)
    assert ticks >= 4
    assert sorted(alone[:3]) == ["a", "b", "heavy"]  # the first run of each: alone (no history)
    assert alone[3:] == ["heavy"] * (ticks - 1)  # 20 % of its timeout: always alone
    assert groups == [["a", "b"]] * (ticks - 1) and all(not r.batch for _, r in link.requests)
    assert [m.metric for m in got].count("a") == [m.metric for m in got].count("b") == ticks  # each delivered
    assert {"a", "b", "heavy"} <= set(reaper.state.last_fetch) and not reaper.state.degraded
    assert all(len(reaper.cost.metrics[m].run_list()) >= 2 for m in "ab")  # each costed
    slow = lanes["slow"]
    assert slow.runs == 2 * ticks + 1  # a group is one run (and one statement in the fake)
    assert slow.statements_total == slow.runs and slow.statements_last_run == 1


async def test_a_group_past_its_deadline_times_out_each_member_which_then_runs_alone(autojump_clock,
                                                                                     caplog) -> None:
    caplog.set_level(logging.ERROR)
    async with grouping() as (reaper, connector):
        connector.others[0].latency = 100.0  # the next group hangs past its deadline (5 s + grace)
        while len(connector.others) < 2:  # the hung connection is dropped; the lane opens another
            await trio.sleep(1)
        assert {"a", "b"} <= reaper.state.degraded
        await trio.sleep(25)
    assert connector.others[0].closed
    timeouts = [r.getMessage() for r in caplog.records if "timed out after 10s" in r.getMessage()]
    assert len(timeouts) == 2 and any("metric a:" in t for t in timeouts) and any("metric b:" in t for t in timeouts)
    again = connector.others[1]
    names = [name for _, name in again.runs]
    assert names.count("a") == 1 and names.count("b") == 1  # alone once each (they succeed: recovered)...
    assert [sorted(r.timed) for _, r in again.requests] == [["a", "b"]] * len(again.requests)  # ...then grouped
    assert again.requests and not {"a", "b"} & reaper.state.degraded


async def test_a_failing_member_is_reported_and_runs_alone_until_it_recovers(autojump_clock) -> None:
    failing = "b"
    got: list[Measurement] = []
    async with grouping(got) as (reaper, connector):
        connector.conn.failing.add(failing)  # shared with the slow lane's link
        delivered = [m.metric for m in got].count("a")
        await trio.sleep(10)
        assert failing in reaper.state.degraded and reaper.state.metric_errors == 1
        assert [m.metric for m in got].count("a") == delivered + 1  # the other member's rows still delivered
        await trio.sleep(10)  # failing again, now alone: still one error per run
        connector.conn.failing.clear()
        await trio.sleep(20)
    link = connector.others[0]
    assert reaper.state.metric_errors == 2 and not reaper.state.degraded
    names = [name for _, name in link.runs]
    assert names.count(failing) == 1 + 2  # its first run, then alone while degraded and once to recover
    assert [sorted(r.timed) for _, r in link.requests][-1] == ["a", "b"]  # then grouped again


async def test_a_member_turning_slow_costs_the_others_no_sample(autojump_clock, caplog) -> None:
    """A group's statement past its timeout: each member runs again alone at once; the healthy one delivers
    that tick's rows, only the slow one fails (and is isolated)."""
    got: list[Measurement] = []
    caplog.set_level(logging.INFO)
    async with grouping(got) as (reaper, connector):
        connector.conn.over_timeout.add("b")
        before = [m.metric for m in got].count("a"), len(connector.others[0].requests)
        while "b" not in reaper.state.degraded:
            await trio.sleep(1)
    link = connector.others[0]
    assert len(link.requests) == before[1] + 1 and link.requests[-1][1].timed.keys() == {"a", "b"}  # cancelled
    assert [name for _, name in link.runs if name != "heavy"][-2:] == ["a", "b"]  # then each alone, right away
    assert [m.metric for m in got].count("a") == before[0] + 1 and reaper.state.degraded == {"b"}
    messages = [r.getMessage() for r in caplog.records]
    assert any("metrics a, b shared a statement that hit their 5s statement_timeout" in m for m in messages)
    assert [m for m in messages if "failed" in m] == [
        "source src: metric b: failed: canceling statement due to statement timeout; isolated (it runs alone in "
        "the slow lane until it succeeds, the other metrics are unaffected)"]


async def test_a_member_hanging_alone_after_its_groups_timeout_drops_the_connection(autojump_clock,
                                                                                  caplog) -> None:
    caplog.set_level(logging.WARNING)
    async with grouping() as (reaper, connector):
        connector.conn.over_timeout.add("a")
        connector.conn.slow["a"] = 100.0  # alone, "a" hangs past its deadline (5 s + grace)
        while len(connector.others) < 2:
            await trio.sleep(1)
    assert connector.others[0].closed and "a" in reaper.state.degraded and "b" not in reaper.state.degraded
    assert [name for _, name in connector.others[0].runs][-1] == "a"  # "b" was not run on the hung connection
    messages = [r.getMessage() for r in caplog.records]
    assert any("metric a: failed: timed out after 10s" in m for m in messages)
    assert any("connection dropped after a metric hung; metric b skipped this time" in m for m in messages)
