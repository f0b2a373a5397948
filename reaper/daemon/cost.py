"""What reaper's own statements cost each monitored server, and the per-source budget that keeps it bounded.

Measuring (issue 15 item 3). Every run of an SQL metric is recorded with its server time, its rows and
an estimate of its bytes:

- in the fast lane's one statement, a clock column before and after each due metric's
  subquery brackets that subquery's execution (reaper.db.combined), so the statement's
  server time is apportioned exactly, metric by metric;
- in the slow lane, a metric runs alone: its time is the duration of its statement(s);
- where pg_stat_statements is installed in the source's database, the server's own view is added once
  per window: the deltas of total_exec_time, shared blocks hit/read and temp blocks of the statements
  whose userid is reaper's role, whose dbid is the source's database and whose text contains
  `reaper_read_only` (every statement reaper sends makes its transaction read-only with a FROM item of
  that name: reaper.db.READ_ONLY_GUARD). pg_stat_statements knows no application_name, so this is how
  reaper's statements are told from other sessions of the same role.

"server ms per minute" of a metric = the mean server time of its recent runs (those of the last window,
at least its last two intervals) x its runs per minute at its current effective interval; rows and bytes
per minute likewise. The bytes are an estimate: rows x the size of the first row as text.

Budget (issue 16 item 1). With `server_budget_ms_per_minute` set ([collector], overridable per source;
0 in a source turns it off there), every step (a sixth of the window) the controller compares the
source's server ms per minute with the budget: over it, the most expensive metric not marked
`budget_exempt` gets its interval doubled (never beyond `max_interval_factor` times the configured
one); under 70 % of the budget, the stretched metric whose step back adds the least goes one step back
toward its configured interval, provided that the step keeps the source within its budget (so that it
does not oscillate). One change per step, one log line per change.

Load guard: with `pause_when_active_backends_over = N`, each tick's statement also counts the server's
active client backends; while there are more than N, the metrics marked `heavy` are skipped.
"""

from __future__ import annotations

import logging
import operator
from array import array
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import orjson

from reaper.config.schema import CollectorConfig, MetricDef, SourceConfig
from reaper.daemon.status import CostStatus
from reaper.daemon.status import MetricCostStatus as MetricFigures
from reaper.db.link import SourceLink
from reaper.db.tick import TickOutcome

log = logging.getLogger("reaper.daemon.cost")
_METRIC = operator.itemgetter(0)
_SERVER_MS = operator.itemgetter(1)
# a metric's figures as a tuple, in MetricFigures' field order: metric, server ms, rows and bytes per minute,
# server seconds, rows and bytes in total, configured and effective interval
Figures = tuple[str, float, float, float, float, int, int, int, int]

STEP_BACK_SHARE = 0.7  # under this share of the budget, stretched intervals step back
STEPS_PER_WINDOW = 6  # the controller looks this many times per window
SERVER_VIEW = "pg_stat_statements"  # the pseudo-metric under which the server's own view is reported
SERVER_VIEW_KEY = "reaper:server_view"  # its name in a tick's batch (no metric name has a colon)
SERVER_VIEW_SQL = """
select coalesce(sum(total_exec_time), 0)::float8 as exec_ms, coalesce(sum(calls), 0)::int8 as calls,
       coalesce(sum(shared_blks_hit), 0)::int8 as hit, coalesce(sum(shared_blks_read), 0)::int8 as read,
       coalesce(sum(temp_blks_read + temp_blks_written), 0)::int8 as temp
from pg_stat_statements
where userid = (select oid from pg_roles where rolname = current_user)
  and dbid = (select oid from pg_database where datname = current_database())
  and query like '%reaper_read_only%'
"""


@attrs.frozen
class CostSettings:
    """The budget settings of one source (the [collector] defaults resolved with its own keys)."""

    budget_ms_per_minute: float | None = None
    max_interval_factor: int = 8
    window_seconds: float = 60.0
    pause_when_active_backends_over: int | None = None

    @classmethod
    def of(cls, collector: CollectorConfig) -> CostSettings:
        return cls(budget_ms_per_minute=collector.server_budget_ms_per_minute,
                   max_interval_factor=collector.max_interval_factor,
                   window_seconds=collector.cost_window_seconds)

    def for_source(self, source: SourceConfig) -> CostSettings:
        budget = self.budget_ms_per_minute
        if source.server_budget_ms_per_minute is not None:
            budget = source.server_budget_ms_per_minute or None  # 0: off for this source
        return attrs.evolve(self, budget_ms_per_minute=budget,
                            max_interval_factor=source.max_interval_factor or self.max_interval_factor,
                            pause_when_active_backends_over=source.pause_when_active_backends_over)

    @property
    def step_seconds(self) -> float:
        return self.window_seconds / STEPS_PER_WINDOW


class Run(NamedTuple):  # one run of a metric, as MetricCost.run_list() gives them
    at: float  # trio time it completed
    seconds: float  # server time
    rows: int
    nbytes: int


RUN_FIELDS = len(Run._fields)


@attrs.define
class MetricCost:
    # the recent runs, flat: at, seconds, rows, nbytes of the oldest, then of the next... in one array of
    # doubles (32 bytes a run, not a tuple or four number objects: ~1.2 KB less per source; rows and bytes are
    # exact up to 2**53), a column is a slice that sum() adds at C speed in the runs' order, and pruning is one
    # `del` (an empty deque alone is 760 bytes per metric)
    runs: array[float] = attrs.field(factory=lambda: array("d"))
    seconds_total: float = 0.0
    rows_total: int = 0
    bytes_total: int = 0
    row_bytes: int = 0  # a row's size as JSON (row_bytes), measured again after SIZE_EVERY runs with rows
    size_in: int = 0  # runs with rows left until then

    def run_list(self) -> list[Run]:
        runs = self.runs
        return [Run(runs[i], runs[i + 1], int(runs[i + 2]), int(runs[i + 3])) for i in range(0, len(runs), RUN_FIELDS)]

    def last_run(self) -> Run | None:
        runs = self.runs
        if not runs:
            return None
        at, seconds, rows, nbytes = runs[-RUN_FIELDS:]
        return Run(at, seconds, int(rows), int(nbytes))

    def prune(self, horizon: float) -> None:
        """Forget the runs completed before `horizon`."""
        runs = self.runs
        i, end = 0, len(runs)
        while i < end and runs[i] < horizon:
            i += RUN_FIELDS
        del runs[:i]


@attrs.frozen
class ServerView:
    """pg_stat_statements' figures for reaper's statements, per minute over the last window."""

    exec_ms_per_minute: float
    calls_per_minute: float
    shared_blks_hit_per_minute: float
    shared_blks_read_per_minute: float
    temp_blks_per_minute: float


#: a metric's row size is measured at its first run with rows, then at every SIZE_EVERY-th (a row's size
#: changes slowly, and writing a row as JSON was ~4 % of a fleet's CPU when done at every run)
SIZE_EVERY = 16


def estimate_bytes(rows: Sequence[Mapping[str, Any]]) -> int:
    """Cheap: the rows times the size of the first row written as JSON."""
    return row_bytes(rows[0]) * len(rows) if rows else 0


def row_bytes(row: Mapping[str, Any]) -> int:
    try:  # one C call
        return len(orjson.dumps(row, default=str))
    except (orjson.JSONEncodeError, TypeError):  # an int beyond 64 bits, a key that is not a string
        return sum(len(str(k)) + (0 if v is None else len(str(v))) for k, v in row.items())


class SourceCost:
    """One source's cost meter and budget controller. Times are the trio clock's, passed in (testable)."""

    def __init__(self, source: str, settings: CostSettings | None = None) -> None:
        self.source = source
        self.settings = settings or CostSettings()
        self.metrics: dict[str, MetricCost] = {}
        self.factors: dict[str, int] = {}  # metric -> its interval's stretch factor (absent: 1)
        self.intervals: dict[str, int] = {}  # the configured intervals last seen
        self.server_view: ServerView | None = None
        self._view_last: tuple[float, dict[str, float]] | None = None
        self._next_step: float | None = None
        self._stuck = False  # over budget with nothing left to stretch (logged once per episode)
        self.active_backends: int | None = None
        self.view_unavailable = False
        self.view_wanted = False  # read pg_stat_statements' view in the next tick (once per window)
        self._next_emit: float | None = None
        self.heavy_paused = False

    def __repr__(self) -> str:
        stretched = {m: f for m, f in self.factors.items() if f > 1}
        return f"<SourceCost {self.source} budget={self.settings.budget_ms_per_minute} stretched={stretched}>"

    # -- measuring -------------------------------------------------------------------------------

    def record(self, metric: str, now: float, seconds: float, rows: Sequence[Mapping[str, Any]]) -> None:
        cost = self.metrics.get(metric)
        if cost is None:  # (not setdefault: that builds a MetricCost for every run of every tick)
            cost = self.metrics[metric] = MetricCost()
        runs = cost.runs
        window = self.settings.window_seconds
        if runs and runs[0] < now - window:  # else none is out of the kept span
            # (inline: _keep_seconds costs three calls, and this runs for every metric of every tick)
            horizon = now - max(window, 2.0 * (self.intervals.get(metric, 0) * self.factors.get(metric, 1)))
            if runs[0] < horizon:
                cost.prune(horizon)
        seconds = max(0.0, seconds)
        count = len(rows)
        nbytes = 0
        if count:
            if cost.size_in <= 0:
                cost.row_bytes, cost.size_in = row_bytes(rows[0]), SIZE_EVERY
            cost.size_in -= 1
            nbytes = cost.row_bytes * count
        runs.extend((now, seconds, count, nbytes))
        cost.seconds_total += seconds
        cost.rows_total += count
        cost.bytes_total += nbytes

    def forget_changed(self, old: Mapping[str, MetricDef], new: Mapping[str, MetricDef]) -> None:
        """A metric whose definition changed (a reload): its past runs say nothing about its cost now."""
        for name, metric in new.items():
            cost = self.metrics.get(name)
            if cost is not None and old.get(name, metric) != metric:
                del cost.runs[:]
                cost.size_in = 0

    def effective_interval(self, metric: str) -> int:
        return self.intervals.get(metric, 0) * self.factors.get(metric, 1)

    def effective(self, intervals: Mapping[str, int]) -> dict[str, int]:
        """The intervals to schedule: the configured ones, stretched by the budget. Remembers `intervals`."""
        self.intervals = {name: int(i) for name, i in intervals.items() if i > 0}
        for name in [m for m in self.factors if m not in self.intervals]:
            del self.factors[name]
        return {name: i * self.factors.get(name, 1) for name, i in intervals.items()}

    def figures(self, now: float) -> list[MetricFigures]:
        """Every measured metric that is still active, most expensive first."""
        return [MetricFigures(*f) for f in self._figures(now)]

    def _figures(self, now: float) -> list[Figures]:
        """figures() as tuples in MetricFigures' field order (cost_rows needs no object per metric)."""
        result: list[Figures] = []
        intervals, factors, window = self.intervals, self.factors, self.settings.window_seconds
        # (this runs for every metric of every source at each status write: the pruning and the effective
        # interval inline, the runs' columns summed from slices at C speed, in the runs' order)
        for name, cost in self.metrics.items():
            interval = intervals.get(name)
            if interval is None:
                continue
            effective = interval * factors.get(name, 1)
            runs = cost.runs
            if runs and runs[0] < now - window:
                horizon = now - max(window, 2.0 * effective)
                if runs[0] < horizon:
                    cost.prune(horizon)
            if runs:
                per_minute = 60.0 / effective if effective > 0 else 0.0
                n = len(runs) // RUN_FIELDS
                seconds, rows, nbytes = sum(runs[1::RUN_FIELDS]), sum(runs[2::RUN_FIELDS]), sum(runs[3::RUN_FIELDS])
            else:
                per_minute, n, seconds, rows, nbytes = 0.0, 1, 0, 0, 0
            result.append((name, 1000.0 * seconds / n * per_minute, rows / n * per_minute, nbytes / n * per_minute,
                           cost.seconds_total, cost.rows_total, cost.bytes_total, interval, effective))
        # most expensive first, then by name: two stable sorts, no key tuple per metric
        result.sort(key=_METRIC)
        result.sort(key=_SERVER_MS, reverse=True)
        return result

    def server_ms_per_minute(self, now: float) -> float:
        return sum(f.server_ms_per_minute for f in self.figures(now))

    def take_server_view(self, now: float, row: Mapping[str, Any]) -> None:
        """One reading of SERVER_VIEW_SQL: the per-minute deltas since the previous one (a reset of
        pg_stat_statements, where a counter went down, gives no figures for that interval)."""
        current = {k: float(row.get(k) or 0) for k in ("exec_ms", "calls", "hit", "read", "temp")}
        last, self._view_last = self._view_last, (now, current)
        if last is None or now <= last[0]:
            return
        delta = {k: current[k] - last[1][k] for k in current}
        if any(v < 0 for v in delta.values()):
            self.server_view = None
            return
        scale = 60.0 / (now - last[0])
        self.server_view = ServerView(exec_ms_per_minute=delta["exec_ms"] * scale,
                                      calls_per_minute=delta["calls"] * scale,
                                      shared_blks_hit_per_minute=delta["hit"] * scale,
                                      shared_blks_read_per_minute=delta["read"] * scale,
                                      temp_blks_per_minute=delta["temp"] * scale)

    # -- the load guard --------------------------------------------------------------------------

    def observe_active(self, active: int | None) -> None:
        """The active backends counted by the last tick's statement: pause or resume the heavy metrics."""
        self.active_backends = active
        limit = self.settings.pause_when_active_backends_over
        paused = limit is not None and active is not None and active > limit
        if paused != self.heavy_paused:
            self.heavy_paused = paused
            if paused:
                log.warning("source %s: %d active backends, over pause_when_active_backends_over = %d: heavy "
                            "metrics skipped until it is not", self.source, active or 0, limit or 0)
            else:
                log.warning("source %s: active backends back to %s: heavy metrics run again", self.source,
                            "?" if active is None else active)

    def skip_heavy(self, metrics: Mapping[str, MetricDef]) -> dict[str, MetricDef]:
        if not self.heavy_paused or self.settings.pause_when_active_backends_over is None:
            return dict(metrics)
        return {name: m for name, m in metrics.items() if not m.heavy}

    # -- the budget ------------------------------------------------------------------------------

    def adjust(self, now: float, definitions: Mapping[str, MetricDef]) -> bool:
        """One controller step (at most one per step_seconds). True when an interval changed."""
        if self._next_step is not None and now < self._next_step:
            return False
        self._next_step = now + self.settings.step_seconds
        budget = self.settings.budget_ms_per_minute
        if budget is None:
            if any(f > 1 for f in self.factors.values()):
                log.warning("source %s: budget: no server budget any more; every metric back to its configured "
                            "interval", self.source)
                self.factors.clear()
                return True
            return False
        spent = {f[0]: f[1] for f in self._figures(now)}  # metric -> server ms per minute, most expensive first
        total = sum(spent.values())
        limit = self.settings.max_interval_factor
        for name, factor in list(self.factors.items()):  # the limit may have been lowered by a reload
            if factor > limit:
                self.factors[name] = limit
        if total > budget:
            candidates = [(ms, name) for name, ms in spent.items() if self.factors.get(name, 1) < limit
                          and ms > 0 and not _exempt(definitions, name)]
            if not candidates:
                if not self._stuck:
                    self._stuck = True
                    log.warning("source %s: budget: %.0f server ms per minute, over the budget of %.0f, and no metric "
                                "left to stretch (the others are budget_exempt or at max_interval_factor %d)",
                                self.source, total, budget, limit)
                return False
            ms, name = max(candidates)  # the most expensive (of equals, the last by name)
            self._set(name, ms, min(limit, 2 * self.factors.get(name, 1)), total, budget, "over")
            return True
        self._stuck = False
        if total < STEP_BACK_SHARE * budget:
            steps = []
            for name, factor in self.factors.items():
                now_ms = spent.get(name)
                if factor <= 1 or now_ms is None:
                    continue
                back = _step_back(factor)
                added = now_ms * (factor / back - 1.0)
                if total + added <= budget:
                    steps.append((added, name, now_ms, back))
            if steps:
                _, name, now_ms, back = min(steps, key=lambda s: (s[0], s[1]))
                self._set(name, now_ms, back, total, budget, "under")
                return True
        return False

    def _set(self, name: str, server_ms: float, factor: int, total: float, budget: float, why: str) -> None:
        old = self.effective_interval(name)
        if factor <= 1:
            self.factors.pop(name, None)
        else:
            self.factors[name] = factor
        new = self.effective_interval(name)
        if why == "over":
            log.warning("source %s: budget: %.0f server ms per minute, over the budget of %.0f; metric %s (%.0f ms "
                        "per minute) stretched: interval %ds -> %ds", self.source, total, budget, name,
                        server_ms, old, new)
        else:
            log.warning("source %s: budget: %.0f server ms per minute, under %.0f%% of the budget of %.0f; metric %s "
                        "steps back: interval %ds -> %ds%s", self.source, total, 100 * STEP_BACK_SHARE, budget, name,
                        old, new, " (as configured)" if factor <= 1 else "")

    # -- what operators see ----------------------------------------------------------------------

    def cost_rows(self, now: float, wall_ns: int) -> list[dict[str, Any]]:
        """The rows of a `reaper_cost` self-measurement: one per metric (and the server's own view), their
        integral numbers as ints (Go's JSON form: `_go`; go_ready_cost_rows says when nothing else is left)."""
        rows: list[dict[str, Any]] = [
            {"epoch_ns": wall_ns, "tag_metric": metric, "server_ms_per_minute": _go(round(server_ms, 3)),
             "rows_per_minute": _go(round(rows_pm, 3)), "bytes_per_minute": _go(round(bytes_pm, 1)),
             "server_seconds_total": _go(round(seconds, 6)), "rows_total": rows, "bytes_total": nbytes}
            for metric, server_ms, rows_pm, bytes_pm, seconds, rows, nbytes, _, _ in self._figures(now)]
        view = self.server_view
        if view is not None:
            rows.append({"epoch_ns": wall_ns, "tag_metric": SERVER_VIEW,
                         "server_ms_per_minute": _go(round(view.exec_ms_per_minute, 3)),
                         "calls_per_minute": _go(round(view.calls_per_minute, 3)),
                         "shared_blks_hit_per_minute": _go(round(view.shared_blks_hit_per_minute, 3)),
                         "shared_blks_read_per_minute": _go(round(view.shared_blks_read_per_minute, 3)),
                         "temp_blks_per_minute": _go(round(view.temp_blks_per_minute, 3))})
        return rows

    def step(self, now: float, wall_ns: int, definitions: Mapping[str, MetricDef]
             ) -> list[tuple[str, list[dict[str, Any]]]] | None:
        """Called after every tick: the controller's step, and once per window (None otherwise) the
        self-measurements to emit."""
        self.adjust(now, definitions)
        if self._next_emit is None:
            self._next_emit = now + self.settings.window_seconds
        if now < self._next_emit:
            return None
        self._next_emit = now + self.settings.window_seconds
        return self.self_measurements(now, wall_ns, definitions)

    def add_server_view(self, link: SourceLink, batch: dict[str, str]) -> None:
        """Once per window (view_wanted), pg_stat_statements' view of reaper's statements rides in the tick's
        one statement as a pseudo-metric (SERVER_VIEW_KEY), where the server can answer it. Its own
        statement on a second connection had each source of a big fleet open that connection every window."""
        if (self.view_wanted and not self.view_unavailable and link.combines
                and "pg_stat_statements" in link.server.extensions):
            batch[SERVER_VIEW_KEY] = SERVER_VIEW_SQL

    def take_server_view_outcome(self, now: float, outcome: TickOutcome) -> None:
        """Take the view's row (or its error) out of a tick's outcome, before its metrics are delivered."""
        rows = outcome.rows.pop(SERVER_VIEW_KEY, None)
        error = outcome.errors.pop(SERVER_VIEW_KEY, None)
        outcome.seconds.pop(SERVER_VIEW_KEY, None)
        if error is not None:
            self.view_unavailable = True
            log.info("source %s: pg_stat_statements cannot be read (%s); the cost figures come from reaper's own "
                     "timings only", self.source, error.splitlines()[0] if error else "error")
        if rows is not None or error is not None:
            self.view_wanted = False
        if rows:
            self.take_server_view(now, rows[0])

    def status(self, now: float) -> CostStatus:
        figures = self.figures(now)
        view = self.server_view
        return CostStatus(server_ms_per_minute=sum(f.server_ms_per_minute for f in figures),
                          budget_ms_per_minute=self.settings.budget_ms_per_minute, metrics=tuple(figures),
                          server_view_ms_per_minute=None if view is None else view.exec_ms_per_minute,
                          active_backends=self.active_backends, heavy_paused=self.heavy_paused)

    def self_measurements(self, now: float, wall_ns: int, definitions: Mapping[str, MetricDef]
                          ) -> list[tuple[str, list[dict[str, Any]]]]:
        """(name, rows) of the self-measurements due now: reaper_cost always, reaper_budget with a budget
        (or while an interval is still stretched)."""
        result = [("reaper_cost", self.cost_rows(now, wall_ns))]
        if self.settings.budget_ms_per_minute is not None or self.factors:
            result.append(("reaper_budget", self.budget_rows(wall_ns, definitions)))
        return [(name, rows) for name, rows in result if rows]

    def budget_rows(self, wall_ns: int, definitions: Mapping[str, MetricDef]) -> list[dict[str, Any]]:
        """The rows of a `reaper_budget` self-measurement: each active metric's effective interval."""
        budget = self.settings.budget_ms_per_minute
        return [{"epoch_ns": wall_ns, "tag_metric": name, "interval_seconds": interval,
                 "effective_interval_seconds": self.effective_interval(name), "factor": self.factors.get(name, 1),
                 "budget_exempt": _exempt(definitions, name), "budget_ms_per_minute": budget}
                for name, interval in sorted(self.intervals.items())]


def _go(x: float) -> float | int:
    """A rounded figure in Go's JSON form when integral (below 2**53 at these magnitudes): an int (Go writes
    `0`, not `0.0`)."""
    return int(x) if x.is_integer() else x


def go_ready_cost_rows(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether cost_rows' rows are wholly in Go's JSON form (Measurement.go_ready, so a JSON sink skips its own
    pass): yes unless a total of seconds (6 decimals) lies in (0, 1e-5), where Go's text and orjson's differ
    (reaper.sinks.encode); every other figure has 3 decimals or fewer."""
    return all(not 0 < row.get("server_seconds_total", 0) < 1e-5 for row in rows)


def _exempt(definitions: Mapping[str, MetricDef], name: str) -> bool:
    metric = definitions.get(name)
    return metric is None or metric.budget_exempt


def _step_back(factor: int) -> int:
    """The next factor toward 1: halve (a factor clipped by max_interval_factor goes to the power of 2 below)."""
    power = 1
    while power * 2 < factor:
        power *= 2
    return power
