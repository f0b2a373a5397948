"""SourceCost's figures, kept in a flat list of runs for speed (issue 14), equal exactly those of the plain
recomputation they replace: random sequences of runs, interval changes, budget stretching, reloads."""

from __future__ import annotations

import random
from collections import deque

from fakes import sql_metric

from reaper.daemon.cost import SIZE_EVERY, CostSettings, Run, SourceCost, go_ready_cost_rows
from reaper.daemon.status import MetricCostStatus
from reaper.measurement import Measurement
from reaper.sinks.jsonfile import encode_measurement

NAMES = ("a", "b", "c", "d")


class Reference:
    """The figures as reaper computed them before (a deque of Run tuples, pruned the same way)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.runs: dict[str, deque[Run]] = {}
        self.totals: dict[str, list[float]] = {}
        self.sized: dict[str, tuple[int, int]] = {}  # a row's bytes, and runs with rows since it was measured

    def nbytes(self, name: str, rows: list[dict[str, object]]) -> int:
        """A row's size measured at the metric's first run with rows and every SIZE_EVERY-th after."""
        if not rows:
            return 0
        size, since = self.sized.get(name, (0, SIZE_EVERY))
        if since >= SIZE_EVERY:
            size, since = len('{"k":"","n":1}') + len(str(rows[0]["k"])), 0
        self.sized[name] = (size, since + 1)
        return size * len(rows)

    def prune(self, name: str, now: float, effective: int) -> None:
        horizon = now - max(self.window, 2.0 * effective)
        runs = self.runs[name]
        while runs and runs[0].at < horizon:
            runs.popleft()

    def record(self, cost: SourceCost, name: str, now: float, seconds: float, rows: int, nbytes: int) -> None:
        runs = self.runs.setdefault(name, deque())
        if runs and runs[0].at < now - self.window:
            self.prune(name, now, cost.effective_interval(name))
        runs.append(Run(now, max(0.0, seconds), rows, nbytes))
        totals = self.totals.setdefault(name, [0.0, 0, 0])
        totals[0] += max(0.0, seconds)
        totals[1] += rows
        totals[2] += nbytes

    def figures(self, cost: SourceCost, now: float) -> list[MetricCostStatus]:
        result = []
        for name, runs in self.runs.items():
            if name not in cost.intervals:
                continue
            effective = cost.effective_interval(name)
            self.prune(name, now, effective)
            per_minute = 60.0 / effective if runs and effective > 0 else 0.0
            n = max(1, len(runs))
            seconds, rows, nbytes = (sum(r.seconds for r in runs), sum(r.rows for r in runs),
                                     sum(r.nbytes for r in runs))
            totals = self.totals[name]
            result.append(MetricCostStatus(
                metric=name, server_ms_per_minute=1000.0 * seconds / n * per_minute,
                rows_per_minute=rows / n * per_minute, bytes_per_minute=nbytes / n * per_minute,
                server_seconds_total=totals[0], rows_total=int(totals[1]), bytes_total=int(totals[2]),
                interval=cost.intervals[name], effective_interval=effective))
        result.sort(key=lambda f: (-f.server_ms_per_minute, f.metric))
        return result


def test_figures_equal_a_recomputation_from_the_runs_after_random_sequences() -> None:
    rng = random.Random(14)
    for _ in range(40):
        window = rng.choice([10.0, 30.0, 60.0])
        cost, ref = SourceCost("s", CostSettings(window_seconds=window)), Reference(window)
        defs = {name: sql_metric(name) for name in NAMES}
        cost.effective({name: rng.choice([1, 2, 5, 30]) for name in NAMES})
        now = 0.0
        for _ in range(300):
            now += rng.choice([0.0, 0.1, 1.0, 3.7, 20.0])
            action = rng.random()
            if action < 0.6:
                name = rng.choice(NAMES)
                seconds = rng.choice([0.0, -0.001, rng.random() * 0.01, rng.random()])
                rows = [{"k": "v" * rng.randint(0, 9), "n": 1}] * rng.randint(0, 4)
                cost.record(name, now, seconds, rows)
                ref.record(cost, name, now, seconds, len(rows), ref.nbytes(name, rows))
            elif action < 0.7:  # a reload: new intervals, some metrics gone
                cost.effective({name: rng.choice([1, 2, 5, 30]) for name in NAMES if rng.random() < 0.8})
            elif action < 0.8:  # the budget stretches or steps back
                name = rng.choice(NAMES)
                if name in cost.intervals:
                    cost.factors[name] = rng.choice([2, 4, 8])
                else:
                    cost.factors.pop(name, None)
            elif action < 0.85:  # a changed definition forgets the metric's runs
                name = rng.choice(NAMES)
                changed = {**defs, name: sql_metric(name, heavy=True)}
                cost.forget_changed(defs, changed)
                ref.runs.get(name, deque()).clear()
                if name in cost.metrics:
                    ref.sized.pop(name, None)
            else:
                assert cost.figures(now) == ref.figures(cost, now)
        assert cost.figures(now) == ref.figures(cost, now)
        assert cost.cost_rows(now, 7) == [  # as they were made from figures()
            {"epoch_ns": 7, "tag_metric": f.metric, "server_ms_per_minute": round(f.server_ms_per_minute, 3),
             "rows_per_minute": round(f.rows_per_minute, 3), "bytes_per_minute": round(f.bytes_per_minute, 1),
             "server_seconds_total": round(f.server_seconds_total, 6), "rows_total": f.rows_total,
             "bytes_total": f.bytes_total} for f in ref.figures(cost, now)]
        for name, metric in cost.metrics.items():
            assert metric.run_list() == list(ref.runs[name])
        _cost_rows_encode_as_the_sinks_own_pass_would(cost.cost_rows(now, 7))


def _cost_rows_encode_as_the_sinks_own_pass_would(rows: list[dict[str, object]]) -> None:
    """reaper_cost's rows are emitted Go-ready when go_ready_cost_rows says so: their JSON must then be what
    the jsonfile sink's own pass over every value writes."""
    ready = Measurement("s", "reaper_cost", "reaper_cost", 7, rows, go_ready=go_ready_cost_rows(rows))
    plain = Measurement("s", "reaper_cost", "reaper_cost", 7, rows)
    assert encode_measurement(ready) == encode_measurement(plain)


def test_cost_rows_are_go_ready_unless_a_seconds_total_is_tiny() -> None:
    cost = SourceCost("s")
    cost.effective({"a": 60, "b": 60})
    cost.record("a", 1.0, 0.000003, [{"x": 1}])  # 3 us: Go writes 0.000003, orjson 3e-06
    cost.record("b", 1.0, 2.0, [])  # integral figures: Go writes 2, not 2.0
    rows = cost.cost_rows(2.0, 7)
    assert not go_ready_cost_rows(rows)
    _cost_rows_encode_as_the_sinks_own_pass_would(rows)
    cost.record("a", 3.0, 0.5, [{"x": 1}])
    rows = cost.cost_rows(4.0, 7)
    assert go_ready_cost_rows(rows) and any(type(v) is int for row in rows for v in row.values()
                                            if v not in (7,) and not isinstance(v, str))
    _cost_rows_encode_as_the_sinks_own_pass_would(rows)


def test_over_budget_of_two_equally_expensive_metrics_the_last_by_name_is_stretched() -> None:
    cost = SourceCost("s", CostSettings(budget_ms_per_minute=100.0))
    cost.effective({"a": 2, "b": 2, "c": 2})
    for name in ("a", "b", "c"):
        cost.record(name, 0.0, 0.5 if name != "c" else 0.1, [])
    assert cost.adjust(0.0, {name: sql_metric(name) for name in ("a", "b", "c")})
    assert cost.factors == {"b": 2}
