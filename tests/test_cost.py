"""The cost meter and the server budget's controller (reaper.daemon.cost): pure, and in a source's loop
under trio's MockClock with a scripted fake database whose metrics report their server time."""

from __future__ import annotations

import itertools
import logging
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio
from fakes import FakeConnection, FakeConnector, catalog, source, sql_metric

from reaper import db
from reaper.config.schema import CollectorConfig, SourceConfig
from reaper.daemon import cost as cost_module
from reaper.daemon.cost import SIZE_EVERY, CostSettings, SourceCost, estimate_bytes
from reaper.daemon.source import FleetControls, SourceReaper
from reaper.measurement import Measurement
from reaper.sinks.selfmetrics import cost_families

DEFS = {m.name: m for m in (sql_metric("slow"), sql_metric("db_stats", budget_exempt=True), sql_metric("cheap"))}


def runs(cost: SourceCost, metric: str, seconds: float, every: int, until: float, start: float = 0.0) -> None:
    t = start
    while t <= until:
        cost.record(metric, t, seconds, [{"epoch_ns": 1, "v": 1}])
        t += every


def budget(ms: float | None, **kw: Any) -> CostSettings:
    return CostSettings(budget_ms_per_minute=ms, **kw)


def test_server_ms_per_minute_is_the_mean_run_times_runs_per_minute() -> None:
    cost = SourceCost("s", budget(None))
    cost.effective({"slow": 2, "db_stats": 10})
    runs(cost, "slow", 0.2, 2, 60)
    runs(cost, "db_stats", 0.01, 10, 60)
    figures = {f.metric: f for f in cost.figures(60)}
    assert figures["slow"].server_ms_per_minute == pytest.approx(6000)  # 200 ms x 30 runs a minute
    assert figures["db_stats"].server_ms_per_minute == pytest.approx(60)
    assert figures["slow"].rows_per_minute == pytest.approx(30)
    assert figures["slow"].server_seconds_total == pytest.approx(0.2 * 31)
    assert [f.metric for f in cost.figures(60)] == ["slow", "db_stats"]  # most expensive first
    assert cost.status(60).server_ms_per_minute == pytest.approx(6060)


def test_runs_older_than_the_window_are_forgotten_and_a_metric_no_longer_active_is_not_shown() -> None:
    cost = SourceCost("s", budget(None, window_seconds=60))
    cost.effective({"slow": 2})
    runs(cost, "slow", 0.3, 2, 100)
    runs(cost, "slow", 0.0, 2, 200, start=102)  # the sleep was removed
    assert cost.figures(200)[0].server_ms_per_minute == 0
    cost.effective({"cheap": 2})
    assert cost.figures(200) == []


def test_bytes_are_estimated_from_the_first_row() -> None:
    assert estimate_bytes([{"ab": "xyz", "n": None}] * 3) == len(b'{"ab":"xyz","n":null}') * 3
    assert estimate_bytes([{"big": 2**70}] * 2) == (3 + 22) * 2  # beyond orjson: the text of the values
    assert estimate_bytes([]) == 0


def test_a_metric_s_row_size_is_measured_once_every_size_every_runs(monkeypatch) -> None:
    """Writing a row as JSON at every run of every metric was ~4 % of a fleet's CPU: the size is measured at
    the first run with rows and at every SIZE_EVERY-th after, and a changed definition measures it again."""
    measured: list[int] = []

    def counting(row: dict[str, object]) -> int:
        measured.append(1)
        return len(str(row["k"]))

    monkeypatch.setattr(cost_module, "row_bytes", counting)
    cost = SourceCost("s")
    cost.effective({"m": 10})
    cost.record("m", 1.0, 0.0, [])  # no rows: nothing to measure
    for i in range(2 * SIZE_EVERY + 1):
        cost.record("m", 2.0 + i, 0.0, [{"k": "x" * (1 + i)}] * 3)
    assert len(measured) == 3
    assert cost.metrics["m"].bytes_total == 3 * (SIZE_EVERY * 1 + SIZE_EVERY * (SIZE_EVERY + 1) + 2 * SIZE_EVERY + 1)
    cost.forget_changed({"m": sql_metric("m")}, {"m": sql_metric("m", heavy=True)})
    cost.record("m", 100.0, 0.0, [{"k": "y"}])
    assert len(measured) == 4


def test_over_budget_the_most_expensive_metric_doubles_until_under_and_exempt_ones_never_move(caplog) -> None:
    caplog.set_level(logging.WARNING, "reaper.daemon.cost")
    cost = SourceCost("main", budget(3000))
    configured = {"slow": 2, "db_stats": 10, "cheap": 2}
    per_run = {"slow": 0.3, "db_stats": 0.05, "cheap": 0.001}  # 9000, 300 and 30 ms per minute as configured
    for second in range(0, 180, 2):
        for name, interval in cost.effective(configured).items():
            if second % interval == 0:
                cost.record(name, second, per_run[name], [])
        cost.adjust(second, DEFS)
    assert cost.effective(configured) == {"slow": 8, "db_stats": 10, "cheap": 2}
    assert cost.server_ms_per_minute(180) == pytest.approx(2250 + 300 + 30)
    assert [r.getMessage() for r in caplog.records] == [
        "source main: budget: 9330 server ms per minute, over the budget of 3000; metric slow (9000 ms per minute) "
        "stretched: interval 2s -> 4s",
        "source main: budget: 4830 server ms per minute, over the budget of 3000; metric slow (4500 ms per minute) "
        "stretched: interval 4s -> 8s",
    ]


def test_never_beyond_max_interval_factor_and_said_once_when_nothing_is_left(caplog) -> None:
    caplog.set_level(logging.WARNING, "reaper.daemon.cost")
    cost = SourceCost("main", budget(10, max_interval_factor=5))
    for step in range(10):
        t = step * 10.0
        cost.effective({"slow": 2, "db_stats": 10})
        cost.record("slow", t, 0.3, [])
        cost.record("db_stats", t, 0.3, [])
        cost.adjust(t, DEFS)
    assert cost.effective({"slow": 2, "db_stats": 10}) == {"slow": 10, "db_stats": 10}  # 1, 2, 4, then 5
    stuck = [r for r in caplog.records if "no metric left to stretch" in r.getMessage()]
    assert len(stuck) == 1


def test_under_70_percent_intervals_step_back_but_never_over_the_budget(caplog) -> None:
    caplog.set_level(logging.WARNING, "reaper.daemon.cost")
    cost = SourceCost("main", budget(3000))
    cost.effective({"slow": 2})
    cost.factors["slow"] = 8  # stretched earlier
    cost.record("slow", 0, 0.3, [])  # 0.3 s every 16 s: 1125 ms per minute, under 70 % of 3000
    assert cost.adjust(0, DEFS)  # back to 8 s: 2250, within the budget
    assert cost.effective({"slow": 2}) == {"slow": 8}
    assert not cost.adjust(10, DEFS)  # 2250 is over 70 %: stays
    assert cost.effective({"slow": 2}) == {"slow": 8}
    cost2 = SourceCost("main", budget(3000))
    cost2.effective({"slow": 2})
    cost2.factors["slow"] = 8
    cost2.record("slow", 0, 0.5, [])  # 1875 now (under 70 %), 3750 after a step back: over, so it stays
    assert not cost2.adjust(0, DEFS)
    assert cost2.factors == {"slow": 8}


def test_without_a_budget_every_interval_goes_back_at_once() -> None:
    cost = SourceCost("main", budget(None))
    cost.effective({"slow": 2})
    cost.factors["slow"] = 4
    assert cost.adjust(0, DEFS)
    assert cost.effective({"slow": 2}) == {"slow": 2}


def test_a_source_overrides_the_collector_budget() -> None:
    collector = CollectorConfig(server_budget_ms_per_minute=3000, max_interval_factor=4, cost_window_seconds=30)
    base = CostSettings.of(collector)
    assert base.for_source(source()).budget_ms_per_minute == 3000
    assert base.for_source(source(server_budget_ms_per_minute=0)).budget_ms_per_minute is None
    own = base.for_source(source(server_budget_ms_per_minute=500, max_interval_factor=2,
                                 pause_when_active_backends_over=20))
    assert (own.budget_ms_per_minute, own.max_interval_factor, own.window_seconds,
            own.pause_when_active_backends_over) == (500, 2, 30, 20)


# -- in a source's loop, under MockClock ---------------------------------------------------------


@attrs.define(eq=False)
class CostlyConnection(FakeConnection):
    """A fake whose metrics take `cost[name]` server seconds each run, and whose server has `active` active
    backends (reported when the tick asks)."""

    cost: dict[str, float] = attrs.field(factory=dict)
    active: int = 0

    async def run_tick(self, request: db.TickRequest) -> db.TickOutcome:
        outcome = await super().run_tick(request)
        return attrs.evolve(outcome, seconds={n: self.cost.get(n, 0.0) for n in outcome.rows},
                            active_backends=self.active if request.count_active else None)


def make(conf: SourceConfig, controls: FleetControls, conn: CostlyConnection) -> tuple[SourceReaper, list[Measurement]]:
    got: list[Measurement] = []
    cat = catalog(sql_metric("slow"), sql_metric("db_stats", budget_exempt=True), sql_metric("bloat", heavy=True))
    reaper = SourceReaper(conf, cat, got.append, connector=FakeConnector(conn=conn), wall_ns=lambda: 42,
                          controls=controls)
    return reaper, got


async def test_a_source_stretches_its_expensive_metric_and_reports_it(autojump_clock) -> None:
    conn = CostlyConnection(cost={"slow": 0.3, "db_stats": 0.001})
    controls = FleetControls(cost=CostSettings(budget_ms_per_minute=3000, window_seconds=60))
    reaper, got = make(source(metrics={"slow": 2, "db_stats": 10}), controls, conn)
    with trio.move_on_after(180):
        async with trio.open_nursery() as n:
            await n.start(reaper.run)
    slow_times = [t for t, r in conn.requests if "slow" in r.batch]
    stats_times = [t for t, r in conn.requests if "db_stats" in r.batch]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(slow_times)]
    # the first run (9000 ms per minute at 2 s) stretches it to 4 s; the next step (10 s later) to 8 s: 2250
    assert gaps[:2] == [4, 4] and set(gaps[2:]) == {8}, gaps
    assert {round(b - a, 6) for a, b in itertools.pairwise(stats_times)} == {10}
    cost = reaper.status().cost
    assert cost is not None and cost.budget_ms_per_minute == 3000
    by_metric = {m.metric: m for m in cost.metrics}
    assert (by_metric["slow"].interval, by_metric["slow"].effective_interval) == (2, 8)
    assert by_metric["slow"].server_ms_per_minute == pytest.approx(2250)
    assert (by_metric["db_stats"].interval, by_metric["db_stats"].effective_interval) == (10, 10)
    budgets = [m for m in got if m.metric == "reaper_budget"]
    costs = [m for m in got if m.metric == "reaper_cost"]
    assert budgets and costs
    last = {r["tag_metric"]: r for r in budgets[-1].rows}
    assert last["slow"]["effective_interval_seconds"] == 8 and last["db_stats"]["effective_interval_seconds"] == 10
    assert last["db_stats"]["budget_exempt"] is True
    assert {r["tag_metric"] for r in costs[-1].rows} == {"slow", "db_stats"}


async def test_heavy_metrics_wait_while_the_server_is_busy(autojump_clock, caplog) -> None:
    conn = CostlyConnection(active=10)
    controls = FleetControls()
    reaper, _ = make(source(metrics={"db_stats": 5, "bloat": 5}, pause_when_active_backends_over=4), controls, conn)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(30)
        busy = [sorted(r.batch) for _, r in conn.requests]
        conn.active = 2
        await trio.sleep(30)
        n.cancel_scope.cancel()
    calm = [sorted(r.batch) for _, r in conn.requests[len(busy):]]
    assert busy[0] == ["bloat", "db_stats"]  # the first tick knows no count yet
    assert all(batch == ["db_stats"] for batch in busy[1:])
    assert ["bloat", "db_stats"] in calm[1:]
    assert all(r.count_active for _, r in conn.requests)
    lines = [r.getMessage() for r in caplog.records if "heavy metrics" in r.getMessage()]
    assert len(lines) == 2, lines  # paused once, resumed once


def test_prometheus_families_carry_each_metrics_server_seconds() -> None:
    cost = SourceCost("main", budget(3000))
    cost.effective({"slow": 2, "db_stats": 10})
    runs(cost, "slow", 0.2, 2, 10)
    runs(cost, "db_stats", 0.01, 10, 10)
    cost.factors["slow"] = 2
    status = SimpleNamespace(name="main", cost=cost.status(10))
    families = {name: (kind, labels, rows) for kind, name, _, labels, rows in cost_families([status])}  # type: ignore[list-item]
    kind, labels, rows = families["reaper_source_server_seconds"]
    assert kind == "counter" and labels == ["source", "metric"]
    assert dict((tuple(v), x) for v, x in rows) == {("main", "slow"): pytest.approx(1.2),
                                                    ("main", "db_stats"): pytest.approx(0.02)}
    assert families["reaper_source_effective_interval_seconds"][2] == [(["main", "slow"], 4.0),
                                                                       (["main", "db_stats"], 10.0)]
    assert families["reaper_source_server_budget_seconds_per_minute"][2] == [(["main"], 3.0)]
    [(_, per_minute)] = families["reaper_source_server_seconds_per_minute"][2]
    assert per_minute == pytest.approx((200 * 15 + 10 * 6) / 1000)  # slow at 4 s now: 15 runs a minute
