"""The per-source loop under trio's MockClock with a scripted fake database.

Timing here is exact: the autojump clock makes virtual time advance only when every task sleeps.
"""

from __future__ import annotations

import functools
import itertools
import logging

import pytest
import trio
import trio.testing
from fakes import FakeConnection, FakeConnector, catalog, source, sql_metric

from reaper.config.schema import MetricDef
from reaper.daemon.source import FleetControls, SourceReaper, supervise
from reaper.measurement import Measurement


def make(conf=None, cat=None, connector=None, **kwargs):
    got: list[Measurement] = []
    connector = connector or FakeConnector()
    reaper = SourceReaper(conf or source(metrics={"a": 10, "b": 20}),
                          cat or catalog(sql_metric("a"), sql_metric("b")),
                          got.append, connector=connector, wall_ns=lambda: 42, **kwargs)
    return reaper, got, connector


async def run_for(seconds: float, *reapers: SourceReaper) -> None:
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as n:
            for r in reapers:
                await n.start(r.run)


def relative(requests, origin):
    return [(round(t - origin, 6), sorted(r.batch), sorted(r.solo)) for t, r in requests]


async def test_due_metrics_go_out_as_one_batch_per_tick(autojump_clock) -> None:
    reaper, got, connector = make()
    start = trio.current_time()
    await run_for(46, reaper)
    reqs = connector.conn.requests
    origin = reqs[0][0]
    assert 0 <= origin - start < 5  # the first tick comes within the phase spread of the start
    assert relative(reqs, origin)[:4] == [
        (0, ["a", "b"], []), (10, ["a"], []), (20, ["a", "b"], []), (30, ["a"], []),
    ]
    assert [m.metric for m in got[:2]] == ["a", "b"]
    assert all(lat == 0 for lat in reaper.state.lateness)


async def test_failing_metric_is_isolated_and_others_arrive_in_the_same_tick(autojump_clock, caplog) -> None:
    reaper, got, connector = make(source(metrics={"a": 10, "bad": 10}), catalog(sql_metric("a"), sql_metric("bad")))
    connector.conn.failing = {"bad"}
    await run_for(35, reaper)
    reqs = connector.conn.requests
    # first tick: both in the batch; bad fails, a is delivered on that very tick
    assert sorted(reqs[0][1].batch) == ["a", "bad"]
    # afterwards bad runs alone in the slow lane (its own connection), outside the fast lane's batch
    assert all(sorted(r.batch) == ["a"] and not r.solo for _, r in reqs[1:])
    slow = connector.others[0]
    assert [name for _, name in slow.runs] == ["bad"] * (len(reqs) - 1)
    assert [m.metric for m in got] == ["a"] * len(reqs)
    assert reaper.state.degraded == {"bad"}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # reported once, naming source and metric
    assert "source src" in errors[0].getMessage() and "metric bad" in errors[0].getMessage()


async def test_degraded_metric_rejoins_the_batch_after_it_succeeds(autojump_clock) -> None:
    reaper, _got, connector = make(source(metrics={"a": 10, "bad": 10}), catalog(sql_metric("a"), sql_metric("bad")))
    connector.conn.failing = {"bad"}
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        while len(connector.conn.requests) < 2:
            await trio.sleep(1)
        connector.conn.failing.clear()
        while len(connector.conn.requests) < 4:
            await trio.sleep(1)
        n.cancel_scope.cancel()
    reqs = [sorted(r.batch) for _, r in connector.conn.requests]
    # ticks 2 and 3 hand bad to the slow lane; it fails at tick 2 and succeeds at tick 3 (after the fix),
    # so from tick 4 on it is back in the batch
    assert reqs[:4] == [["a", "bad"], ["a"], ["a"], ["a", "bad"]]
    assert [name for _, name in connector.others[0].runs] == ["bad", "bad"]
    assert reaper.state.degraded == set()


async def test_unreachable_source_backs_off_and_logs_each_state_change_once(autojump_clock, caplog) -> None:
    connector = FakeConnector(down=True)
    reaper, got, _ = make(source(metrics={"a": 1, "instance_up": 1}), connector=connector, max_backoff=8)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(40)
        connector.down = False
        await trio.sleep(10)
        n.cancel_scope.cancel()
    first = connector.attempts[0]
    gaps = [round(b - a) for a, b in zip(connector.attempts, connector.attempts[1:], strict=False)]
    assert gaps[:5] == [1, 2, 4, 8, 8]  # capped exponential backoff, on the 1 s tick grid
    assert connector.attempts[-1] - first <= 40 + 8  # back within one backoff period of the server's return
    downs = [r for r in caplog.records if "down:" in r.getMessage()]
    ups = [r for r in caplog.records if "up again" in r.getMessage()]
    assert len(downs) == 1 and len(ups) == 1
    up_values = [m.rows[0]["instance_up"] for m in got if m.metric == "instance_up"]
    assert up_values[:30] == [0] * 30  # instance_up keeps reporting while the server is down
    assert up_values[-1] == 1
    assert any(m.metric == "a" for m in got)


async def test_hanging_source_does_not_delay_another(autojump_clock) -> None:
    hanging, _, _hang_conn = make(source("hang", metrics={"a": 1}, connect_timeout_seconds=5),
                                 connector=FakeConnector(hang=True))
    healthy, _got, conn = make(source("ok", metrics={"a": 1}))
    await run_for(30, hanging, healthy)
    assert hanging.state.status == "down"
    assert "timed out" in (hanging.state.last_error or "")
    assert len(conn.conn.requests) >= 29
    assert max(healthy.state.lateness) == 0


async def test_slow_query_beyond_its_deadline_drops_the_connection(autojump_clock, caplog) -> None:
    reaper, got, connector = make(source(metrics={"a": 10}, query_timeout_seconds=3), catalog(sql_metric("a")))
    connector.conn.latency = 100
    await run_for(40, reaper)
    first_request = connector.conn.requests[0][0]
    # the tick's deadline is the query timeout plus a grace of 5 s; then the connection is dropped,
    # and the next connect attempt comes at the next tick after a 1 s backoff
    assert connector.attempts[1] - first_request == pytest.approx(10.0)
    assert any("query timed out" in r.getMessage() for r in caplog.records)
    assert got == []


async def test_recovery_switches_to_the_standby_metric_set(autojump_clock, caplog) -> None:
    cat = catalog(sql_metric("a"), sql_metric("p_only", node_status="primary"),
                  sql_metric("s_only", node_status="standby"))
    reaper, _got, connector = make(source(metrics={"a": 10, "p_only": 10, "s_only": 10}), cat)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        while len(connector.conn.requests) < 2:
            await trio.sleep(1)
        connector.conn.in_recovery = True
        while len(connector.conn.requests) < 5:
            await trio.sleep(1)
        n.cancel_scope.cancel()
    batches = [sorted(r.batch) for _, r in connector.conn.requests]
    assert batches[0] == ["a", "p_only"]
    assert batches[-1] == ["a", "s_only"]
    assert any("switching to the standby metric set" in r.getMessage() for r in caplog.records)


async def test_update_applies_new_intervals_without_reconnecting(autojump_clock) -> None:
    reaper, _got, connector = make(source(metrics={"a": 10}), catalog(sql_metric("a"), sql_metric("b")))
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(25)
        reaper.update(source(metrics={"a": 10, "b": 5}), reaper.catalog)
        await trio.sleep(20)
        n.cancel_scope.cancel()
    assert len(connector.attempts) == 1
    assert any("b" in r.batch for _, r in connector.conn.requests)


async def test_pause_stops_queries_and_closes_the_connection_until_lifted(autojump_clock) -> None:
    controls = FleetControls()
    reaper, _got, connector = make(source(metrics={"a": 1}), catalog(sql_metric("a")), controls=controls)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(5)
        controls.paused = True
        await trio.sleep(1)
        paused_at = len(connector.conn.requests)
        assert connector.conn.closed and reaper.state.status == "paused"
        await trio.sleep(20)
        assert len(connector.conn.requests) == paused_at  # not one query while paused
        controls.paused = False
        await trio.sleep(3)
        n.cancel_scope.cancel()
    assert len(connector.conn.requests) > paused_at
    assert len(connector.attempts) == 2  # reconnected once after the pause


async def test_only_if_primary_probes_but_does_not_collect_on_a_standby(autojump_clock, caplog) -> None:
    reaper, got, connector = make(source(metrics={"a": 1}, only_if_primary=True), catalog(sql_metric("a")))
    connector.conn.in_recovery = True
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(10)
        assert got == [] and reaper.state.status == "skipped"
        assert all(not r.batch and not r.solo for _, r in connector.conn.requests)  # probes only
        connector.conn.in_recovery = False  # promoted
        await trio.sleep(3)
        n.cancel_scope.cancel()
    assert [m.metric for m in got][:1] == ["a"]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "not collecting" in m]) == 1
    assert len([m for m in messages if "collecting again" in m]) == 1


async def test_min_db_size_skips_small_databases(autojump_clock) -> None:
    controls = FleetControls(min_db_size_mb=500)
    reaper, got, connector = make(source(metrics={"a": 1}), catalog(sql_metric("a")), controls=controls)
    connector.conn.db_size_bytes = 10 * 1024 * 1024
    await run_for(30, reaper)
    assert got == [] and reaper.state.status == "skipped"
    assert len(connector.conn.fetches) == 1  # the size is checked once per fleetrules.SIZE_CHECK_SECONDS, not per tick


class Boom(Exception):
    pass


async def test_supervisor_restarts_a_crashing_source_then_stops_it_until_a_reload(autojump_clock, caplog) -> None:
    """Past the limit the source stays stopped (status "crashed"), the daemon goes on; a reload tries it again.
    Its traceback is logged once per distinct error, later crashes in one line."""
    reaper, _, _ = make()
    runs = []

    async def crash(*, task_status=trio.TASK_STATUS_IGNORED):
        runs.append(trio.current_time())
        task_status.started()
        raise Boom("bug")

    reaper.run = crash  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(supervise, reaper, restart_limit=3, window=300, jitter=lambda: 1.0))
        while reaper.state.retry is None:
            await trio.sleep(1)
        assert reaper.state.status == "crashed" and "Boom: bug" in (reaper.state.last_error or "")
        assert [round(b - a, 6) for a, b in itertools.pairwise(runs)] == [1, 2, 4]
        await trio.sleep(3600)
        assert len(runs) == 4  # stopped: no retry of its own
        reaper.state.retry.set()  # a reload (Reconciler._apply_config)
        while len(runs) < 5:
            await trio.sleep(1)
        n.cancel_scope.cancel()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert any("crashed 4 times in 300s" in r.getMessage() for r in caplog.records)


async def test_supervisor_backoff_is_jittered_capped_and_reset_after_a_healthy_run(autojump_clock) -> None:
    reaper, _, _ = make()
    runs = []
    lengths = iter([0, 0, 0, 0, 0, 0, 0, 200, 0, 0])

    async def crash(*, task_status=trio.TASK_STATUS_IGNORED):
        runs.append(trio.current_time())
        task_status.started()
        await trio.sleep(next(lengths))
        if len(runs) == 10:
            return
        raise Boom("bug")

    reaper.run = crash  # type: ignore[method-assign]
    await supervise(reaper, restart_limit=100, window=10_000, jitter=lambda: 0.5)
    starts = [round(b - a, 6) for a, b in itertools.pairwise(runs)]
    # waits 0.5, 1, 2, 4, 8, 16, 30 (capped at 60 * 0.5); then a 200 s healthy run resets the backoff
    assert starts[:7] == [0.5, 1, 2, 4, 8, 16, 30]
    assert starts[7] == 200 + 0.5
    assert starts[8] == 1


def test_fake_connection_is_a_plain_object() -> None:
    assert not FakeConnection().is_closed


class UptimeConnection(FakeConnection):
    uptimes = iter([100, 110, 5, 15])

    async def run_tick(self, request):
        outcome = await super().run_tick(request)
        for row in outcome.rows.get("db_stats", []):
            row["postmaster_uptime_s"] = next(self.uptimes)
        return outcome


async def test_uptime_going_backwards_is_reported_as_a_restart(autojump_clock, caplog) -> None:
    connector = FakeConnector(conn=UptimeConnection())
    reaper, got, _ = make(source(metrics={"db_stats": 10}), catalog(sql_metric("db_stats")), connector=connector)
    await run_for(40, reaper)
    changes = [m for m in got if m.table == "object_changes"]
    assert len(changes) == 1 and changes[0].rows[0]["details"] == "Detected server restart (or failover)"
    assert [m.table for m in got].index("object_changes") == 2  # right before the db_stats row that showed it
    assert sum("restart (or failover) detected" in r.getMessage() for r in caplog.records) == 1


async def test_a_fleet_connects_at_most_32_at_a_time_and_spreads_its_ticks(autojump_clock) -> None:
    controls = FleetControls(phase_spread=50.0)
    in_flight, most = 0, 0

    class SlowConnector(FakeConnector):
        async def __call__(self, config):
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                await trio.sleep(1)
                return await super().__call__(config)
            finally:
                in_flight -= 1

    reapers = [make(source(f"s{i}", metrics={"a": 60}), catalog(sql_metric("a")), connector=SlowConnector(),
                    controls=controls)[0] for i in range(300)]
    await run_for(120, *reapers)
    assert most <= 32
    assert all(r.state.status == "up" for r in reapers)  # waiting for a turn is no connect timeout
    assert all(r.state.ticks >= 1 for r in reapers)
    starts = sorted(r.connector.attempts[0] for r in reapers)
    assert starts[-1] - starts[0] > 20  # the first ticks are spread over the phase spread, not one instant


async def test_a_fleet_ticks_by_groups_on_its_grid(autojump_clock) -> None:
    """FleetControls.fleet_size puts the sources' ticks on a grid (reaper.schedule.tick_slot_seconds): 64
    sources over a 60 s tick wake in 4 groups, each tick of a group at the same instant, none later than
    one spread after its start."""
    controls = FleetControls(phase_spread=60.0, fleet_size=64)
    made = [make(source(f"s{i}", metrics={"a": 60}), catalog(sql_metric("a")), controls=controls) for i in range(64)]
    reapers = [r for r, _, _ in made]
    await run_for(130, *reapers)
    firsts = [connector.conn.requests[0][0] for _, _, connector in made]
    assert len(set(firsts)) <= 4 + 1  # 4 slots (a grid step may fall inside the start-up)
    assert max(firsts) - min(firsts) < 60
    assert all(len(c.conn.requests) >= 2 and c.conn.requests[1][0] - c.conn.requests[0][0] == 60 for _, _, c in made)


def test_a_reload_forgets_the_failing_and_slow_marks_of_metrics_removed_or_changed() -> None:
    """A metric removed from the config stayed 'degraded' in status for ever; a changed one kept its old mark."""
    reaper, _, _ = make(conf=source(metrics={"a": 10, "b": 20, "c": 30}),
                        cat=catalog(sql_metric("a"), sql_metric("b"), sql_metric("c")))
    reaper.health.failed("a", "boom")
    reaper.health.failed("b", "boom")
    reaper.state.slow.add("c")
    reaper.update(source(metrics={"b": 20, "c": 30}),  # a removed; c's SQL changed; b as it was
                  catalog(sql_metric("a"), sql_metric("b"), MetricDef(name="c", description="c", sql={14: "select 2"})))
    assert reaper.state.degraded == {"b"} and reaper.state.slow == set()
    assert reaper.health.alone == {"b"}
