"""The per-source reaper loop and its supervisor.

One trio task per monitored source. It wakes at the GCD tick, picks the metrics due, sends every
due SQL metric to the server in ONE combined statement (one asyncpg call, one trio-asyncio
crossing), and hands the rows to the fan-out. A failing metric is isolated and run alone
("degraded") until it succeeds again. An unreachable server is retried with capped exponential
backoff, logged once per state change; instance_up keeps reporting 0 meanwhile.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from reaper import db
from reaper.catalog.metrics import SPECIAL_METRICS, Catalog
from reaper.config.schema import MetricDef, SourceConfig
from reaper.daemon.cache import InstanceCache
from reaper.errors import MetricError, MetricUnavailable, SourceUnavailable
from reaper.measurement import Measurement
from reaper.schedule import PHASE_SPREAD, Schedule
from reaper.special import SpecialContext, SpecialSpec, special_spec

log = logging.getLogger("reaper.daemon.source")

Connector = Callable[[SourceConfig], Awaitable[Any]]
Emit = Callable[[Measurement], None]
QUERY_GRACE_SECONDS = 5.0
POOLER_KINDS = frozenset({"pgbouncer", "pgpool"})
SIZE_CHECK_SECONDS = 600.0
MAX_PARALLEL_CONNECTS = 32
DB_SIZE_SQL = "select (sum(relpages)::int8 * current_setting('block_size')::int8) as bytes from pg_class"


@attrs.define(eq=False)
class FleetControls:
    """Daemon-wide switches every source obeys (emergency pause, minimum database size)."""

    paused: bool = False
    min_db_size_mb: int = 0
    create_extensions: tuple[str, ...] = ()
    phase_spread: float = PHASE_SPREAD  # seconds over which the sources' ticks are spread
    # at most this many sources connect at the same moment (a fleet's start must not storm the servers)
    connects: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(MAX_PARALLEL_CONNECTS))


async def connect_source(config: SourceConfig) -> Any:
    """A connection fit for the source's kind: PostgreSQL (one combined statement per tick), or a
    pooler's admin console (PgBouncer, Pgpool-II: the simple query protocol, one command per metric)."""
    if config.kind == "pgbouncer" or config.kind == "pgpool":
        from reaper.db.simple import open_simple_connection

        return await open_simple_connection(config.dsn, kind=config.kind,
                                            statement_timeout_seconds=config.query_timeout_seconds,
                                            password_file=config.password_file)
    return await db.open_source_connection(
        config.dsn, statement_timeout_seconds=config.query_timeout_seconds,
        password_file=config.password_file)


@attrs.define(eq=False)
class SourceState:
    """What an operator (status, demo, self-metrics) can see of a source."""

    name: str
    status: str = "starting"  # starting | up | down
    ticks: int = 0
    measurements: int = 0
    rows: int = 0
    metric_errors: int = 0
    last_tick_wall: float | None = None
    next_tick: float | None = None  # trio clock
    last_error: str | None = None
    in_recovery: bool | None = None
    server_version: str | None = None
    degraded: set[str] = attrs.field(factory=set)
    lateness: deque[float] = attrs.field(factory=lambda: deque(maxlen=1000))
    statements_last_tick: int = 0
    last_fetch: dict[str, float] = attrs.field(factory=dict)  # metric -> trio time it last completed
    metric_rows: dict[str, int] = attrs.field(factory=dict)  # metric -> rows in its last measurement
    metric_measurements: dict[str, int] = attrs.field(factory=dict)  # metric -> measurements delivered


class SourceReaper:
    """Collects one source. `run()` is its whole life; `update()` changes what it collects in place."""

    def __init__(self, config: SourceConfig, catalog: Catalog, emit: Emit, *,
                 connector: Connector = connect_source, wall_ns: Callable[[], int] = time.time_ns,
                 max_backoff: float = 60.0, controls: FleetControls | None = None,
                 instance_cache: InstanceCache | None = None) -> None:
        self.controls = controls or FleetControls()
        self.instance_cache = instance_cache
        self._special_state: dict[str, dict[str, Any]] = {}  # per special metric, kept across updates
        self._last_uptime: float | None = None
        self._extensions_tried = False
        self._skip_reason: str | None = None  # why the source is connected but not collected
        self._size_checked_at: float | None = None
        self._too_small = False
        self.config = config
        self.catalog = catalog
        self.emit = emit
        self.connector = connector
        self.wall_ns = wall_ns
        self.max_backoff = max_backoff
        self.state = SourceState(config.name)
        self.conn: Any = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._warned: set[tuple[str, str]] = set()
        self._changed = trio.Event()

    def __repr__(self) -> str:
        s = self.state
        nxt = "" if s.next_tick is None else f" next_tick={max(0.0, s.next_tick - trio.current_time()):.1f}s"
        return f"<Source {s.name} {s.status} degraded={len(s.degraded)}{nxt}>"

    # -- configuration -----------------------------------------------------------------------

    def update(self, config: SourceConfig, catalog: Catalog) -> None:
        """Apply a new preset/metrics/tags without reconnecting; takes effect at the next tick."""
        self.config, self.catalog = config, catalog
        self._changed.set()

    def active_intervals(self) -> dict[str, int]:
        standby = bool(self.state.in_recovery)
        return self.catalog.intervals(self.config, standby=standby)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sched = Schedule.starting(trio.current_time(), self.config.name, self.active_intervals(),
                                  self.controls.phase_spread)
        task_status.started()
        try:
            while True:
                sched.set_intervals(self.active_intervals())
                k, when = sched.next_tick(trio.current_time())
                self.state.next_tick = when
                with trio.move_on_at(when):
                    await self._changed.wait()
                if self._changed.is_set():  # config changed: re-read intervals before sleeping on
                    self._changed = trio.Event()
                    continue
                due = sched.take(k)
                self.state.lateness.append(trio.current_time() - when)
                await self.tick(due)
        finally:
            if self.conn is not None:
                conn, self.conn = self.conn, None
                await conn.close()

    async def tick(self, due: list[str]) -> None:
        """Collect the due metrics once."""
        st = self.state
        st.ticks += 1
        st.last_tick_wall = time.time()
        wall_ns = self.wall_ns()
        metrics = {name: self.catalog.metrics[name] for name in due if name in self.catalog.metrics}
        if self.controls.paused:
            if self.conn is not None:  # an emergency pause closes connections too
                conn, self.conn = self.conn, None
                await conn.close()
            st.status = "paused"
            return
        if (self.conn is None or self.conn.is_closed) and not await self._ensure_connected():
            self._emit_instance_up(metrics, 0, wall_ns)
            return
        if not await self._should_collect():
            metrics = {}  # the tick only probes the recovery state (to notice a promotion)
        elif st.in_recovery is not None:
            active = self.active_intervals()  # the role may have changed since this tick's set was chosen
            metrics = {name: m for name, m in metrics.items() if name in active}
        batch: dict[str, str] = {}
        solo: dict[str, db.SoloQuery] = {}
        timed: dict[str, db.SoloQuery] = {}
        specials: dict[str, tuple[MetricDef, SpecialSpec]] = {}
        now = trio.current_time()
        intervals = self.active_intervals() if self.instance_cache is not None else {}
        for name, metric in metrics.items():
            if name == "instance_up":
                continue
            if metric.special or name in SPECIAL_METRICS:
                spec = self._special(metric)
                if spec is not None:
                    specials[name] = (metric, spec)
                continue
            cached = self._cached(metric, now, intervals.get(name, 0))
            if cached is not None:
                self._deliver(metric, cached, wall_ns, shared=True)
                st.last_fetch[name] = now
                continue
            sql = self._route(metric)
            if sql is None:
                continue
            if name in st.degraded:
                solo[name] = db.SoloQuery(sql, metric.statement_timeout_seconds)
            elif metric.statement_timeout_seconds is not None:
                timed[name] = db.SoloQuery(sql, metric.statement_timeout_seconds)
            else:
                batch[name] = sql
        try:
            # the statements run one after the other, each bounded server-side by its own timeout
            default = self.config.query_timeout_seconds
            deadline = (default + sum({q.statement_timeout_seconds or default for q in timed.values()})
                        + sum(q.statement_timeout_seconds or default for q in solo.values()))
            with trio.fail_after(deadline + QUERY_GRACE_SECONDS):
                outcome = await self.conn.run_tick(db.TickRequest(batch=batch, solo=solo, timed=timed))
        except (SourceUnavailable, trio.TooSlowError) as e:
            reason = "query timed out" if isinstance(e, trio.TooSlowError) else str(e)
            self._drop_connection()
            self._mark_down(reason)
            self._emit_instance_up(metrics, 0, wall_ns)
            return
        st.statements_last_tick = outcome.statements
        now = trio.current_time()
        if outcome.in_recovery is not None and outcome.in_recovery != st.in_recovery:
            if st.in_recovery is not None:
                log.warning("source %s: server is now %s; switching to the %s metric set", st.name,
                            "in recovery" if outcome.in_recovery else "a primary",
                            "standby" if outcome.in_recovery else "primary")
            st.in_recovery = outcome.in_recovery
            self._changed.set()
        role = None if outcome.in_recovery is None else ("standby" if outcome.in_recovery else "primary")
        for name, rows in outcome.rows.items():
            if role is not None and metrics[name].node_status not in (None, role):
                continue  # the role changed under this tick: its rows would describe the wrong role
            if name == "db_stats" and rows:
                self._detect_restart(rows[0], wall_ns)
            self._deliver(metrics[name], rows, wall_ns)
            self._remember(metrics[name], now, rows)
            st.last_fetch[name] = now
            if name in st.degraded:
                st.degraded.discard(name)
                log.warning("source %s: metric %s: recovered; back in the batch", st.name, name)
        for name, message in outcome.errors.items():
            st.last_fetch[name] = now
            self._metric_failed(name, message)
        for metric, spec in specials.values():
            await self._run_special(metric, spec, wall_ns)
        self._emit_instance_up(metrics, 1, wall_ns)

    def _detect_restart(self, row: dict[str, Any], wall_ns: int) -> None:
        """A postmaster uptime that went backwards means the server restarted (or failed over)."""
        uptime = row.get("postmaster_uptime_s")
        if not isinstance(uptime, int | float):
            return
        last, self._last_uptime = self._last_uptime, float(uptime)
        if last is not None and uptime < last:
            log.warning("source %s: server restart (or failover) detected: uptime %ss, was %ss", self.state.name,
                        uptime, last)
            marker = MetricDef(name="object_changes", description="restarts and failovers")
            self._deliver(marker, [{"epoch_ns": wall_ns, "details": "Detected server restart (or failover)"}],
                          wall_ns)

    def _metric_failed(self, name: str, message: str, *, special: bool = False) -> None:
        st = self.state
        st.metric_errors += 1
        if name not in st.degraded:
            st.degraded.add(name)
            if special:
                log.error("source %s: metric %s: failed: %s (reported once until it works again; the other "
                          "metrics are unaffected)", st.name, name, message)
            else:
                log.error("source %s: metric %s: failed: %s; isolated (it runs alone until it succeeds, "
                          "the other metrics are unaffected)", st.name, name, message)
        else:
            log.debug("source %s: metric %s: still failing: %s", st.name, name, message)

    async def _run_special(self, metric: MetricDef, spec: SpecialSpec, wall_ns: int) -> None:
        st = self.state
        ctx = SpecialContext(source=self.config, server=self.conn.server, conn=self.conn, metric=metric,
                             wall_ns=wall_ns, state=self._special_state.setdefault(metric.name, {}))
        try:
            with trio.fail_after(spec.deadline_seconds):
                result = await spec.handler(ctx)
        except MetricUnavailable as e:
            self._warn_once(metric.name, "unavailable", f"cannot be collected here: {e.message}; skipped")
            return
        except (MetricError, SourceUnavailable, trio.TooSlowError, OSError) as e:
            if isinstance(e, trio.TooSlowError):
                reason = f"timed out after {spec.deadline_seconds:g}s"
            else:
                reason = e.message if isinstance(e, MetricError) else str(e)
            self._metric_failed(metric.name, reason, special=True)
            return
        st.last_fetch[metric.name] = trio.current_time()
        if metric.name in st.degraded:
            st.degraded.discard(metric.name)
            log.warning("source %s: metric %s: recovered", st.name, metric.name)
        for table, rows in result:
            self._deliver(metric, rows, wall_ns, table=table)

    async def _should_collect(self) -> bool:
        """Fleet rules: only_if_primary and min_db_size_mb. Logged once per change of verdict."""
        reason = None
        if self.config.only_if_primary and self.state.in_recovery:
            reason = "the server is in recovery and only_if_primary is set"
        elif self.controls.min_db_size_mb > 0 and self.config.kind not in POOLER_KINDS:
            now = trio.current_time()
            if self._size_checked_at is None or now - self._size_checked_at >= SIZE_CHECK_SECONDS:
                self._size_checked_at = now
                try:
                    with trio.fail_after(self.config.query_timeout_seconds):
                        rows = await self.conn.fetch(DB_SIZE_SQL)
                    size_mb = int(rows[0]["bytes"] or 0) / 1024 / 1024
                    self._too_small = size_mb < self.controls.min_db_size_mb
                except (SourceUnavailable, trio.TooSlowError):
                    pass  # the next tick's batch reports the connection state
            if self._too_small:
                reason = f"the database is smaller than min_db_size_mb ({self.controls.min_db_size_mb} MB)"
        if reason != self._skip_reason:
            if reason:
                log.warning("source %s: not collecting: %s", self.state.name, reason)
            elif self._skip_reason:
                log.warning("source %s: collecting again", self.state.name)
            self._skip_reason = reason
        if reason:
            self.state.status = "skipped"
        elif self.state.status == "skipped":
            self.state.status = "up"
        return reason is None

    # -- routing -------------------------------------------------------------------------------

    def _route(self, metric: MetricDef) -> str | None:
        """The SQL to run for a due metric on this server, or None (unsupported here: warned once)."""
        server = self.conn.server
        sql = metric.sql_for(server.major)
        if sql is None:
            self._warn_once(metric.name, "version",
                            f"has no SQL for PostgreSQL {server.major} (versions: "
                            f"{', '.join(map(str, sorted(metric.sql)))}); skipped")
            return None
        missing = [e for e in metric.requires_extension if e not in server.extensions]
        if missing:
            self._warn_once(metric.name, "extension",
                            f"needs the extension {', '.join(missing)}, which is not installed in "
                            f"database {server.database}; skipped")
            return None
        return sql

    def _special(self, metric: MetricDef) -> SpecialSpec | None:
        spec = special_spec(metric.name)
        if spec is None:
            self._warn_once(metric.name, "special", "is not collected by this version of reaper; skipped")
            return None
        return spec  # whether it can run here (e.g. on the server's host) is the handler's to say

    def _cache_key(self, metric: MetricDef) -> tuple[str, str, str] | None:
        server = self.conn.server
        if self.instance_cache is None or not metric.instance_level or not server.system_identifier:
            return None
        return (server.system_identifier, server.address, metric.name)

    def _cached(self, metric: MetricDef, now: float, interval: float) -> list[dict[str, Any]] | None:
        """Rows another source of the same instance fetched less than one interval ago (and within the
        cache's max age): as fresh as fetching them ourselves."""
        key = self._cache_key(metric)
        if key is None or self.instance_cache is None:
            return None
        return self.instance_cache.get(key, now, max_age=interval)

    def _remember(self, metric: MetricDef, now: float, rows: list[dict[str, Any]]) -> None:
        key = self._cache_key(metric)
        if key is not None and self.instance_cache is not None:
            self.instance_cache.put(key, now, rows)

    def _warn_once(self, metric: str, why: str, text: str) -> None:
        if (metric, why) not in self._warned:
            self._warned.add((metric, why))
            log.warning("source %s: metric %s %s", self.state.name, metric, text)

    # -- delivery ------------------------------------------------------------------------------

    def _deliver(self, metric: MetricDef, rows: list[dict[str, Any]], wall_ns: int, *, table: str | None = None,
                 shared: bool = False) -> None:
        """Hand rows to the sinks, each row tagged like pgwatch's with real_dbname and sys_id.

        `shared` rows (from the instance cache) are copied first: they are another source's too.
        """
        if not rows:
            return
        server = self.conn.server if self.conn is not None else None
        if server is not None:
            extra = {"real_dbname": server.database, "sys_id": server.system_identifier}
            if shared:
                rows = [{**row, **extra} for row in rows]
            else:
                for row in rows:
                    row.update(extra)
        m = Measurement.from_rows(source=self.config.name, metric=metric.name, table=table or metric.table,
                                  rows=rows, tags=self.config.tags, wall_ns=wall_ns)
        st = self.state
        st.measurements += 1
        st.rows += len(rows)
        st.metric_rows[metric.name] = len(rows)
        st.metric_measurements[metric.name] = st.metric_measurements.get(metric.name, 0) + 1
        self.emit(m)

    def _emit_instance_up(self, metrics: Mapping[str, MetricDef], up: int, wall_ns: int) -> None:
        metric = metrics.get("instance_up")
        if metric is not None:
            self._deliver(metric, [{"epoch_ns": wall_ns, "instance_up": up}], wall_ns)
            self.state.last_fetch["instance_up"] = trio.current_time()

    # -- connection state ----------------------------------------------------------------------

    async def _ensure_connected(self) -> bool:
        now = trio.current_time()
        if self.state.status == "down" and now < self._retry_at:
            return False
        if self.state.status == "paused":
            log.info("source %s: resuming after the pause", self.state.name)
        try:
            async with self.controls.connects:  # waiting for a turn does not count against the timeout
                with trio.fail_after(self.config.connect_timeout_seconds):
                    self.conn = await self.connector(self.config)
        except (SourceUnavailable, trio.TooSlowError) as e:
            reason = (f"connect timed out after {self.config.connect_timeout_seconds:g}s"
                      if isinstance(e, trio.TooSlowError) else str(e))
            self._mark_down(reason)
            return False
        server = self.conn.server
        st = self.state
        if st.status == "down" and self._down_since is not None:
            log.warning("source %s: up again after %.1fs (%s)", st.name, now - self._down_since,
                        self._product(server))
        else:
            log.info("source %s: connected (%s, database %s%s)", st.name, self._product(server),
                     server.database, ", in recovery" if server.in_recovery else "")
        st.status, st.last_error, st.server_version = "up", None, server.version
        await self._create_extensions()
        if st.in_recovery != server.in_recovery:
            self._changed.set()  # the metric set follows the role: re-read the intervals at once
        st.in_recovery = server.in_recovery
        self._backoff, self._down_since = 0.0, None
        return True

    def _product(self, server: Any) -> str:
        return server.version if self.config.kind in POOLER_KINDS else f"PostgreSQL {server.version}"

    async def _create_extensions(self) -> None:
        """Opt-in ([collector] create_extensions): create the listed extensions on a primary, once."""
        if self.config.kind in POOLER_KINDS:
            return
        wanted = [e for e in self.controls.create_extensions if e not in self.conn.server.extensions]
        if not wanted or self.conn.server.in_recovery or self._extensions_tried:
            return
        self._extensions_tried = True
        try:
            with trio.fail_after(self.config.query_timeout_seconds):
                result = await self.conn.create_extensions(wanted)
        except (SourceUnavailable, trio.TooSlowError) as e:
            log.warning("source %s: could not create extensions %s: %s", self.state.name, ", ".join(wanted), e)
            return
        for name, error in result.items():
            if error is None:
                log.info("source %s: created extension %s", self.state.name, name)
            else:
                log.warning("source %s: could not create extension %s: %s", self.state.name, name, error)

    def _mark_down(self, reason: str) -> None:
        st = self.state
        now = trio.current_time()
        self._backoff = min(self.max_backoff, max(1.0, self._backoff * 2))
        self._retry_at = now + self._backoff
        if st.status != "down":
            self._down_since = now
            log.error("source %s: down: %s (%s); retrying with backoff up to %gs", st.name, reason,
                      self.config.redacted_dsn, self.max_backoff)
        st.status, st.last_error = "down", reason

    def _drop_connection(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None


# -- supervision -------------------------------------------------------------------------------

RESTART_LIMIT = 5
RESTART_WINDOW_SECONDS = 300.0
HEALTHY_AFTER_SECONDS = 120.0  # a run this long resets the restart backoff
RESTART_BACKOFF_MAX = 60.0


class TooManyRestarts(Exception):
    """A source task kept crashing with unexpected errors: a bug, so the daemon exits non-zero."""


async def supervise(reaper: SourceReaper, *, restart_limit: int = RESTART_LIMIT,
                    window: float = RESTART_WINDOW_SECONDS, jitter: Callable[[], float] | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a source, restarting it after an unexpected error with capped, jittered exponential backoff
    (reset once a run has stayed healthy), within an intensity limit.

    Expected failures (an unreachable server, a failing metric) never reach here: the source loop
    handles them. Anything that does is a bug; after `restart_limit` crashes within `window`
    seconds the error propagates and stops the daemon with the cause.
    """
    jitter = jitter or (lambda: random.uniform(0.5, 1.0))
    crashes: deque[float] = deque()
    delay = 1.0
    started = False
    while True:
        began = trio.current_time()
        try:
            if started:
                await reaper.run()
            else:
                await reaper.run(task_status=task_status)
                started = True
            return
        except Exception as e:
            started = True
            now = trio.current_time()
            if now - began >= HEALTHY_AFTER_SECONDS:
                delay = 1.0
            crashes.append(now)
            while crashes and crashes[0] < now - window:
                crashes.popleft()
            if len(crashes) > restart_limit:
                raise TooManyRestarts(
                    f"source {reaper.config.name}: crashed {len(crashes)} times in {window:g}s; last error: {e!r}"
                ) from e
            wait = delay * jitter()
            log.exception("source %s: unexpected error (a bug); restarting in %.1fs", reaper.config.name, wait)
            reaper.state.status = "restarting"
            await trio.sleep(wait)
            delay = min(delay * 2, RESTART_BACKOFF_MAX)
