"""One source's nursery: the fast lane (its tick loop) and, beside it, the slow lane and local collectors.

`SourceReaper.run()` opens a nursery per source (supervised by reaper.daemon.supervise) holding:

- the **fast lane** (this module): wakes at the GCD tick, picks the metrics due, and sends every due
  SQL metric to the server in ONE combined statement (one asyncpg call, one trio-asyncio crossing)
  on the source's first connection; the statement also reports pg_is_in_recovery(). Nothing else is
  sent in a tick. When the combined statement fails, its metrics are re-run one by one in that
  tick (so the good ones are delivered); a failing one is marked degraded and from the next tick on
  runs in the slow lane until it succeeds again, then it rejoins the batch.
- the **slow lane** and the **local collectors** (reaper.daemon.lanes): metrics with their own
  statement_timeout_seconds, degraded metrics and special metrics. The fast lane hands them their
  due work and never waits for it. At most two connections per source.

An unreachable server is retried with capped exponential backoff, logged once per state change; a
source that goes down emits instance_up = 0 at once (whether or not instance_up is due in that tick)
and keeps reporting 0 at its interval meanwhile.

`tick()` alone (without `run()`, as `reaper once` and some tests use it) runs everything in order on
the one connection: there are no lanes then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from reaper import db
from reaper.catalog.metrics import SPECIAL_METRICS, Catalog
from reaper.config.schema import MetricDef, SourceConfig
from reaper.daemon.alarms import Sleeper
from reaper.daemon.cache import InstanceCache
from reaper.daemon.cost import SERVER_VIEW_KEY, SERVER_VIEW_SQL, SourceCost, go_ready_cost_rows
from reaper.daemon.delivery import Output
from reaper.daemon.fleetrules import FleetRules
from reaper.daemon.jobs import Job, timeout_share
from reaper.daemon.lanes import MIN_IDLE_SECONDS, Lane, LaneState, open_lanes
from reaper.daemon.metrichealth import LEAST_BOUND, MetricHealth
from reaper.daemon.rides import Rides
from reaper.daemon.route import BatchMembers, route_sql
from reaper.daemon.sourcestate import (
    FleetControls,
    SourceState,
    connect_in_turn,
    connect_source,
    say_extensions,
    say_reconnected,
)
from reaper.daemon.status import LaneStatus, SourceStatus, percentile
from reaper.daemon.supervise import supervise
from reaper.db.link import SourceLink
from reaper.errors import MetricError, MetricUnavailable, SourceUnavailable
from reaper.measurement import Measurement
from reaper.schedule import Schedule
from reaper.special import SpecialContext, SpecialSpec, special_spec

__all__ = ["Connector", "FleetControls", "SourceReaper", "connect_source", "supervise"]

log = logging.getLogger("reaper.daemon.source")

Connector = Callable[[SourceConfig], Awaitable[SourceLink]]
Emit = Callable[[Measurement], None]
QUERY_GRACE_SECONDS = 5.0


class SourceReaper:
    """Collects one source. `run()` is its whole life; `update()` changes what it collects in place."""

    def __init__(self, config: SourceConfig, catalog: Catalog, emit: Emit, *,
                 connector: Connector = connect_source, wall_ns: Callable[[], int] = time.time_ns,
                 max_backoff: float = 60.0, controls: FleetControls | None = None,
                 instance_cache: InstanceCache | None = None, min_idle: float = MIN_IDLE_SECONDS) -> None:
        self.controls = controls or FleetControls()
        self.instance_cache = instance_cache
        self._special_state: dict[str, dict[str, Any]] = {}  # per special metric, kept across updates
        self._specs: dict[str, SpecialSpec | None] = {}  # special_spec() per name (it imports and builds one)
        self._intervals: tuple[tuple[Any, ...], dict[str, int]] | None = None  # active_intervals()
        self.rules = FleetRules()  # only_if_primary, min_db_size_mb, create_extensions
        self.config = config
        self.catalog = catalog
        self.emit = emit
        self.connector = connector
        self.wall_ns = wall_ns
        self.max_backoff = max_backoff
        self.min_idle = min_idle
        self.state = SourceState(config.name)
        self.health = MetricHealth(self.state)  # which metrics leave the batch (failing or slow)
        self.cost = SourceCost(config.name, self.controls.cost.for_source(config))  # server time, the budget
        self.conn: SourceLink | None = None  # the fast lane's connection
        self.slow: Lane | None = None  # the lanes exist while run() runs
        self.local: Lane | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._warned: frozenset[tuple[str, str]] = frozenset()  # rarely added to (an empty set: 216 bytes)
        self.out = Output(self)
        self.rides = Rides(config.name)  # specials whose reads ride in the fast lane's statement
        self._sleep = Sleeper(self.controls.alarms)  # until the next tick; poked when config or role change
        self._batch = BatchMembers()

    def __repr__(self) -> str:
        s = self.state
        nxt = "" if s.next_tick is None else f" next_tick={max(0.0, s.next_tick - trio.current_time()):.1f}s"
        return f"<Source {s.name} {s.status} degraded={len(s.degraded)}{nxt}>"

    @property
    def name(self) -> str:
        return self.config.name

    # -- configuration -----------------------------------------------------------------------

    def update(self, config: SourceConfig, catalog: Catalog) -> None:
        """Apply a new preset/metrics/tags without reconnecting; takes effect at the next tick."""
        self.cost.forget_changed(self.catalog.metrics, catalog.metrics)
        old = self.catalog.metrics
        self.config, self.catalog = config, catalog
        active = self.active_intervals()
        self.health.forget(lambda name: name in active and old.get(name) == catalog.metrics.get(name))
        self._sleep.poke()

    def active_intervals(self) -> dict[str, int]:
        """Metric -> interval for the current config, catalog and role: computed once per change of them (it
        is read several times a tick; update() and the reconciler replace the objects). Not to be changed."""
        key = (self.config, self.catalog, bool(self.state.in_recovery))
        cached = self._intervals
        if cached is None or any(a is not b for a, b in zip(cached[0], key, strict=True)):
            cached = self._intervals = (key, self.catalog.intervals(self.config, standby=key[2]))
        return cached[1]

    # -- the nursery ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The source's nursery: the slow lane and the local collectors (tasks only while they have
        work) beside the fast lane."""
        try:
            async with open_lanes(self, min_idle=self.min_idle) as (self.slow, self.local):
                await self._fast_lane(task_status)
        finally:
            self.slow = self.local = None
            if self.conn is not None:
                conn, self.conn = self.conn, None
                await conn.close()

    async def _fast_lane(self, task_status: trio.TaskStatus[None]) -> None:
        sched = Schedule.starting(trio.current_time(), self.config.name, self.active_intervals(),
                                  self.controls.phase_spread, self.controls.fleet_size)
        task_status.started()
        while True:
            sched.set_intervals(self.cost.effective(self.active_intervals()))  # stretched by the budget
            k, when = sched.next_tick(trio.current_time())
            self.state.next_tick = when
            await self._sleep.until(when)
            if self._sleep.poked:  # config changed: re-read intervals before sleeping on
                self._sleep.poked = False
                continue
            due = sched.take(k)
            late = trio.current_time() - when
            self.state.lateness.append(late)
            self.controls.lateness.observe(late)
            if self.slow is not None:
                self.slow.close_if_idle()  # unused for idle_seconds: its connection closes
            await self.tick(due)
            self.worked()

    def status(self) -> SourceStatus:
        st = self.state
        lat = sorted(st.lateness)
        lanes = [LaneStatus(name="fast", connected=self.conn is not None and not self.conn.is_closed,
                            statements_last_run=st.statements_last_tick, statements_total=st.statements_total,
                            runs=st.ticks, skipped=0)]
        for lane in (self.slow, self.local):
            if lane is not None:
                ls: LaneState = lane.state
                lanes.append(LaneStatus(name=ls.name, connected=ls.connected,
                                        statements_last_run=ls.statements_last_run,
                                        statements_total=ls.statements_total, runs=ls.runs, skipped=ls.skipped,
                                        error=ls.error))
        return SourceStatus(
            name=st.name, status=st.status, ticks=st.ticks, measurements=st.measurements, rows=st.rows,
            metric_errors=st.metric_errors, degraded=tuple(sorted(st.degraded)), slow=tuple(sorted(st.slow)),
            statements_last_tick=st.statements_last_tick, in_recovery=st.in_recovery,
            server_version=st.server_version, last_error=st.last_error, last_tick_wall=st.last_tick_wall,
            next_tick_in=None if st.next_tick is None else max(0.0, st.next_tick - trio.current_time()),
            lateness_p50=percentile(lat, 0.5), lateness_p99=percentile(lat, 0.99),
            lateness_max=lat[-1] if lat else 0.0, lanes=tuple(lanes), cost=self.cost.status(trio.current_time()))

    # -- one tick ------------------------------------------------------------------------------

    async def tick(self, due: list[str]) -> None:
        """Collect the due metrics once: the batch here, the rest handed to the lanes (or, without
        lanes, run after the batch on the same connection)."""
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
            self.out.instance_up(metrics, 0, wall_ns)
            return
        link = self.conn
        assert link is not None
        before, server = link.statements, link.server
        self.cost.settings = settings = self.controls.cost.for_source(self.config)
        if not await self.rules.should_collect(self.config, self.controls, st, link):
            metrics = {}  # the tick only probes the recovery state (to notice a promotion)
        elif st.in_recovery is not None:
            active = self.active_intervals()  # the role may have changed since this tick's set was chosen
            metrics = {name: m for name, m in metrics.items() if name in active}
        universe = self._universe(link)
        batch, jobs = self._route_all(link, self.cost.skip_heavy(metrics), wall_ns, universe)
        rides = self.rides.plan(jobs, link.server, batch, self.cost)  # cheap specials' reads, in this statement
        self.cost.add_server_view(link, batch)  # once per window, in this statement (no second connection)
        count_active = settings.pause_when_active_backends_over is not None
        outcome: db.TickOutcome | None = None
        reason = "query timed out"
        try:  # (a plain scope: trio.fail_after is a generator-based context manager, and this runs every tick)
            with trio.move_on_after(self.config.query_timeout_seconds + QUERY_GRACE_SECONDS):
                outcome = await link.run_tick(db.TickRequest(batch=batch, count_active=count_active,
                                                              universe=universe))
        except SourceUnavailable as e:
            reason = str(e)
        if outcome is None:
            self._drop_connection()
            self._mark_down(reason)
            self.out.instance_up(metrics, 0, wall_ns)
            return
        st.statements_last_tick = link.statements - before
        if link.server is not server:  # extensions created or dropped: the metric set follows (reaper.db.facts)
            self._warned = say_extensions(st.name, server, link.server, self._warned)
        st.statements_total += st.statements_last_tick
        self.cost.take_server_view_outcome(trio.current_time(), outcome)  # taken out of the metrics' rows
        outcome, jobs = self.rides.take(rides, outcome, jobs)
        self._take_outcome(metrics, outcome, wall_ns)
        self.cost.observe_active(outcome.active_backends if count_active else None)
        self._cost_step(wall_ns)
        if self.slow is not None and self.local is not None:
            for job in jobs:
                (self.local if job.spec is not None and job.spec.local_only else self.slow).offer(job)
        else:
            for job in jobs:  # no lanes (`reaper once`): in order, on this connection
                try:
                    await self.run_job(job, link)
                except (SourceUnavailable, trio.TooSlowError):
                    self.job_timed_out(job)
        self.out.instance_up(metrics, 1, wall_ns)

    def _universe(self, link: SourceLink) -> Mapping[str, str]:
        """The batch statement's members now (route.BatchMembers), pg_stat_statements' view among them when
        the cost meter can read it; none on a pooler's console (each command alone, reaper.db.simple)."""
        if not link.combines:
            return {}
        view = not self.cost.view_unavailable and "pg_stat_statements" in link.server.extensions
        return self._batch.members(link.server, self.catalog.metrics, self.active_intervals(), self.health.alone,
                                   SPECIAL_METRICS, ((SERVER_VIEW_KEY, SERVER_VIEW_SQL),) if view else ())

    def _route_all(self, conn: SourceLink, metrics: Mapping[str, MetricDef], wall_ns: int,
                   members: Mapping[str, str]) -> tuple[dict[str, str], list[Job]]:
        """Split the due metrics: the tick's batch (name -> SQL; a member of the batch statement has its SQL for
        this server already) and the jobs for the lanes."""
        batch: dict[str, str] = {}
        jobs: list[Job] = []
        now = trio.current_time()
        intervals = self.active_intervals()
        default = self.config.query_timeout_seconds
        for name, metric in metrics.items():
            interval = float(intervals.get(name, 0))
            if name == "instance_up":
                continue
            if metric.special or name in SPECIAL_METRICS:
                spec = self._special(metric)
                # an instance-level special (the host's OS figures) fetched by another source of the
                # same instance less than an interval ago is delivered from the cache, like SQL metrics
                if spec is not None and not self.out.deliver_cached(conn, metric, now, interval, wall_ns):
                    jobs.append(Job(metric, wall_ns, interval, spec.deadline_seconds, spec=spec))
                continue
            if self.out.deliver_cached(conn, metric, now, interval, wall_ns):
                continue
            sql = members.get(name)
            if sql is not None:
                batch[name] = sql
                continue
            sql = route_sql(conn.server, metric, self._warn_once)
            if sql is None:
                continue
            timeout = metric.statement_timeout_seconds
            if name in self.health.alone or timeout is not None:
                query = db.SoloQuery(sql, timeout)
                jobs.append(Job(metric, wall_ns, interval, (timeout or default) + QUERY_GRACE_SECONDS, query=query))
            else:
                batch[name] = sql
        return batch, jobs

    def _take_outcome(self, metrics: Mapping[str, MetricDef], outcome: db.TickOutcome, wall_ns: int) -> None:
        st = self.state
        now = trio.current_time()
        if outcome.in_recovery is not None and outcome.in_recovery != st.in_recovery:
            if st.in_recovery is not None:
                log.warning("source %s: server is now %s; switching to the %s metric set", st.name,
                            "in recovery" if outcome.in_recovery else "a primary",
                            "standby" if outcome.in_recovery else "primary")
            st.in_recovery = outcome.in_recovery
            self._sleep.poke()
        role = None if outcome.in_recovery is None else ("standby" if outcome.in_recovery else "primary")
        for name, rows in outcome.rows.items():
            if role is not None and metrics[name].node_status not in (None, role):
                continue  # the role changed under this tick: its rows would describe the wrong role
            if name == "db_stats" and rows:
                self.out.detect_restart(rows[0], wall_ns)
            ready = name in outcome.go_ready
            self.out.deliver(metrics[name], rows, wall_ns, go_ready=ready)
            self.out.remember(metrics[name], now, rows, go_ready=ready)
            st.last_fetch[name] = now
            seconds = outcome.seconds.get(name, 0.0)
            self.cost.record(name, now, seconds, rows)
            if seconds > LEAST_BOUND:  # (the common case stays a comparison)
                self.health.batch_took(name, seconds, self.active_intervals)
        for name, message in outcome.errors.items():
            st.last_fetch[name] = now
            self.health.failed(name, message)

    def _cost_step(self, wall_ns: int) -> None:
        """The budget's step (the fast lane re-reads the effective intervals next); once per window the
        cost self-measurements, and pg_stat_statements' view read in the next tick's statement."""
        done = self.cost.step(trio.current_time(), wall_ns, self.catalog.metrics)
        for metric, rows in done or ():  # (reaper_cost's rows are made in Go's JSON form: no pass of the sink's)
            self.emit(Measurement.from_rows(source=self.name, metric=metric, table=metric, rows=rows, wall_ns=wall_ns,
                                            tags=self.config.tags, go_ready=metric == "reaper_cost"
                                            and go_ready_cost_rows(rows)))
        if done is not None:
            self.cost.view_wanted = True

    # -- work outside the tick (the lanes call these) --------------------------------------------

    async def open_link(self) -> SourceLink:
        """A second connection for the slow lane (same limits as the fast lane's connect)."""
        return await connect_in_turn(self.controls, self.config, self.connector)

    def worked(self) -> None:
        """After a tick or a lane's run: the status file's writer checks what changed (statuswrite)."""
        self.controls.worked(self.config.name)

    async def link_opened(self, link: SourceLink) -> None:
        """What the slow lane's new connection reads before any job takes it: the local collectors' server
        facts, which they would otherwise wait for behind a slow metric's statement (reaper.special.facts)."""
        if self._has_local_collectors():
            from reaper.special.facts import prime_facts  # (only a source with OS metrics imports it)

            await prime_facts(link, self.config.connect_timeout_seconds)

    def _has_local_collectors(self) -> bool:
        for name in self.active_intervals():
            metric = self.catalog.metrics.get(name)  # (instance_up: the tick's own, no collector to look up)
            if metric is not None and name != "instance_up" and (metric.special or name in SPECIAL_METRICS):
                spec = self._special(metric)
                if spec is not None and spec.local_only:
                    return True
        return False

    async def run_job(self, job: Job, link: SourceLink) -> None:
        """Run one job and deliver its rows. Raises SourceUnavailable, or trio.TooSlowError past its deadline."""
        started = trio.current_time()
        with trio.fail_after(job.deadline):
            if job.spec is not None:
                await self._run_special(job.metric, job.spec, job.wall_ns, link, job.given)
                if not job.spec.local_only:  # its server time: its statements' duration, or its reads' in the tick's
                    seconds = trio.current_time() - started if job.given is None else sum(job.given.seconds.values())
                    self.cost.record(job.metric.name, trio.current_time(), seconds, ())
                return
            assert job.query is not None
            try:
                rows = await link.run_one(job.metric.name, job.query)
            except MetricError as e:
                self.job_failed(job, e.message)
                return
        self.job_done(job, rows, trio.current_time() - started)  # alone in its statement: its duration is its cost

    def timeout_share(self, job: Job) -> float | None:
        """Whether (and how cheaply) the job may share a statement with others of its tick (reaper.daemon.jobs)."""
        return timeout_share(job, self.cost, self.state.degraded)

    def job_done(self, job: Job, rows: list[dict[str, Any]], seconds: float, *, go_ready: bool = False) -> None:
        """A job's rows (its metric's run alone, or its part of a group's): delivered, costed, recovered."""
        name, now = job.metric.name, trio.current_time()
        self.cost.record(name, now, seconds, rows)
        self.out.deliver(job.metric, rows, job.wall_ns, go_ready=go_ready)
        self.out.remember(job.metric, now, rows, go_ready=go_ready)
        self.state.last_fetch[name] = now
        self.health.recovered(name, back_in_batch=job.metric.statement_timeout_seconds is None)
        self.health.alone_took(name, seconds, self.active_intervals)

    def job_failed(self, job: Job, message: str) -> None:
        self.state.last_fetch[job.metric.name] = trio.current_time()
        self.health.failed(job.metric.name, message)

    def job_timed_out(self, job: Job) -> None:
        self.health.failed(job.metric.name, f"timed out after {job.deadline:g}s", special=job.spec is not None)


    async def _run_special(self, metric: MetricDef, spec: SpecialSpec, wall_ns: int, link: SourceLink,
                           given: db.TickOutcome | None = None) -> None:
        server = self.conn.server if self.conn is not None else link.server  # one server, two connections
        ctx = SpecialContext(source=self.config, server=server, conn=link, metric=metric,
                             wall_ns=wall_ns, state=self._special_state.setdefault(metric.name, {}), given=given)
        try:
            result = await spec.handler(ctx)
        except MetricUnavailable as e:
            self._warn_once(metric.name, "unavailable", f"cannot be collected here: {e.message}; skipped")
            return
        except (MetricError, OSError) as e:
            self.health.failed(metric.name, e.message if isinstance(e, MetricError) else str(e), special=True)
            return
        except Exception as e:  # a bug (or a tool's output it cannot read): this metric alone, said once
            self.out.bug(metric, e, wall_ns)
            return
        now = self.state.last_fetch[metric.name] = trio.current_time()
        self.health.recovered(metric.name, back_in_batch=False)
        for table, rows in result:
            self.out.deliver(metric, rows, wall_ns, table=table)
        if len(result) == 1 and result[0][0] in (None, metric.table):
            self.out.remember(metric, now, result[0][1])  # instance-level ones only (the cache's rule)

    # -- routing -------------------------------------------------------------------------------

    def _special(self, metric: MetricDef) -> SpecialSpec | None:
        if metric.name not in self._specs:  # (this runs for every due special of every tick)
            self._specs[metric.name] = special_spec(metric.name)
        spec = self._specs[metric.name]
        if spec is None:
            self._warn_once(metric.name, "special", "is not collected by this version of reaper; skipped")
            return None
        return spec  # whether it can run here (e.g. on the server's host) is the handler's to say

    def _warn_once(self, metric: str, why: str, text: str) -> None:
        if (metric, why) not in self._warned:
            self._warned |= {(metric, why)}
            # a preset's metric made for other versions (stat_lock: 19) is expected there: said, not warned
            chosen = metric in self.config.metrics or metric in self.config.standby_metrics or why != "version"
            log.log(logging.WARNING if chosen else logging.INFO, "source %s: metric %s %s", self.state.name,
                    metric, text)

    # -- connection state ----------------------------------------------------------------------

    async def _ensure_connected(self) -> bool:
        now, before = trio.current_time(), self.conn.server if self.conn is not None else None  # (closed while idle)
        if self.state.status == "down" and now < self._retry_at:
            return False
        if self.state.status == "paused":
            log.info("source %s: resuming after the pause", self.state.name)
        try:
            conn = self.conn = await connect_in_turn(self.controls, self.config, self.connector)
        except SourceUnavailable as e:
            self._mark_down(str(e))
            return False
        server = conn.server
        st = self.state
        if st.status == "down" and self._down_since is not None:
            log.warning("source %s: up again after %.1fs (%s)", st.name, now - self._down_since, conn.product)
        elif before is not None:
            self._warned = say_reconnected(st.name, before, conn.server, conn.product, self._warned)
        else:
            log.info("source %s: connected (%s, database %s%s)", st.name, conn.product,
                     server.database, ", in recovery" if server.in_recovery else "")
        st.status, st.last_error, st.server_version = "up", None, server.version
        await self.rules.create_extensions(self.config, self.controls, conn)
        if st.in_recovery != server.in_recovery:
            self._sleep.poke()  # the metric set follows the role: re-read the intervals at once
        st.in_recovery = server.in_recovery
        self._backoff, self._down_since = 0.0, None
        self.rides.blocked = frozenset()  # a special whose reads failed in a tick's statement may try again
        return True

    def _mark_down(self, reason: str) -> None:
        """Note the outage; on the transition to down, emit instance_up = 0 at once (if it is collected)."""
        st = self.state
        now = trio.current_time()
        self._backoff = min(self.max_backoff, max(1.0, self._backoff * 2))
        self._retry_at = now + self._backoff
        if st.status != "down":
            self._down_since = now
            log.error("source %s: down: %s (%s)%s", st.name, reason, self.config.redacted_dsn,
                      f"; retrying with backoff up to {self.max_backoff:g}s" if self.max_backoff else "")
            self.out.went_down(self.active_intervals(), self.wall_ns())
        st.status, st.last_error = "down", reason

    def _drop_connection(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None
