"""A source's slow lane and its local collectors: work that must never delay a fast-lane tick.

The fast lane (reaper.daemon.source) decides what is due; work that is not part of the tick's one
statement is handed here as a `Job`:

- the **slow lane** runs metrics with their own `statement_timeout_seconds`, degraded metrics and
  special metrics that talk to the server (change_events, server log) one after the other, on its
  own connection (the source's second and last one). The connection is opened when a job needs it
  and closed after the lane has been idle for `idle_seconds` (twice its longest interval, at least
  MIN_IDLE_SECONDS): the fast lane asks at each tick (`close_if_idle`).
- the **local lane** runs the collectors that read the host (OS metrics via psutil); the few server
  facts they need are read through the slow lane's connection (`LeasedLink`, one statement at a time
  under the slow lane's lock), so a source never holds more than two connections.

A lane holds no task while it has no work (at 1000 sources, 2000 tasks fewer): `offer()` starts its
serving task in the source's nursery (`attach`) when none runs, and that task ends when the queue is
empty; the connection stays open meanwhile. An unexpected error in a job ends the source's nursery,
as a bug anywhere in the source does (its supervisor restarts it).

A job whose metric is still queued or running in its lane when it comes due again is skipped and
counted (`LaneState.skipped`): work never queues up behind a slow metric. Of the jobs of one tick, a
lane first runs those under the statement_timeout its connection has now (a change of timeout costs one
statement, reaper.db.SET_TIMEOUT), so two timeouts alternate once per tick, not at every job; and the timed
SQL jobs of one tick under one timeout that are known to be cheap run as ONE combined statement
(reaper.daemon.jobs), each still skipped, delivered, costed and failed as its own metric. The lanes
report what they sent in `LaneState` (statements of the last job, total), shown by `reaper status`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import attrs
import trio

from reaper.daemon.jobs import GroupAbandoned, Job, JobOwner, run_group, take_group
from reaper.db import ServerInfo, SoloQuery, TickOutcome, TickRequest
from reaper.db.link import Row, SourceLink
from reaper.errors import SourceUnavailable

log = logging.getLogger("reaper.daemon.source")

MIN_IDLE_SECONDS = 60.0
LANE_CAPACITY = 64  # jobs waiting in a lane; a metric is in it at most once (more are skipped)


@attrs.define
class LaneState:
    name: str
    connected: bool = False
    runs: int = 0
    statements_last_run: int = 0
    statements_total: int = 0
    skipped: int = 0  # jobs dropped because the same metric was still queued or running
    error: str | None = None  # why its connection cannot be opened now (None: it can, or it is not needed yet)


class LaneOwner(JobOwner, Protocol):
    """What a lane needs from its source (reaper.daemon.source.SourceReaper)."""

    async def open_link(self) -> SourceLink: ...

    async def link_opened(self, link: SourceLink) -> None: ...

    def worked(self) -> None: ...

    def timeout_share(self, job: Job) -> float | None: ...


class Lane:
    """Runs the jobs handed to it one after the other, in a task that lives while it has work.
    `offer()` never blocks the caller."""

    __slots__ = ("_busy", "_idle_since", "_longest", "_nursery", "_opens", "_pending", "_queue", "_skip_warned",
                 "lease", "link", "lock", "min_idle", "opener", "owner", "state")  # two per source: no __dict__ each

    def __init__(self, name: str, owner: LaneOwner, *, lease: Lane | None = None,
                 min_idle: float = MIN_IDLE_SECONDS) -> None:
        self.state = LaneState(name)
        self.owner = owner
        self.lease = lease  # run jobs over another lane's connection instead of owning one
        self.min_idle = min_idle
        self.link: SourceLink | None = None
        self.opener: trio.Lock | None = None  # held while a task opens the connection (made at the first open)
        # one statement at a time on this lane's connection (a leasing lane's runs take its lender's, in LeasedLink)
        self.lock: trio.Lock = trio.Lock() if lease is None else lease.lock
        self._nursery: trio.Nursery | None = None  # the source's (attach); the serving task runs in it
        self._busy = False  # a task of this lane runs (serving its queue, or closing its idle connection)
        self._idle_since = 0.0  # when its connection was last used
        self._queue: list[Job] = []  # offered, not run yet (see _next_job)
        # metrics queued or running here, and those whose skip was logged: made at the first use (most lanes of
        # a big fleet never get a job; two empty sets are 432 bytes)
        self._pending: set[str] | None = None
        self._skip_warned: set[str] | None = None
        self._longest = 0.0
        self._opens = 0  # connections opened: the first is said at INFO, the others (idle closes) at debug level

    def __repr__(self) -> str:
        pending = len(self._pending or ())
        return f"<Lane {self.owner.name}/{self.state.name} pending={pending} skipped={self.state.skipped}>"

    @property
    def idle_seconds(self) -> float:
        return max(self.min_idle, 2 * self._longest)

    def attach(self, nursery: trio.Nursery) -> None:
        """The source's nursery: the lane's tasks run in it (and end with it)."""
        self._nursery = nursery

    def offer(self, job: Job) -> bool:
        """Queue `job` unless its metric is still queued or running here (then skip it and count)."""
        name = job.metric.name
        pending = self._pending
        if pending is None:
            pending = self._pending = set()
        if name in pending or len(self._queue) >= LANE_CAPACITY:
            self._skip(name)
            return False
        self._queue.append(job)
        pending.add(name)
        if math.isfinite(job.interval):
            self._longest = max(self._longest, job.interval)
        self._wake()
        return True

    def _wake(self) -> None:
        if not self._busy and self._queue and self._nursery is not None:
            self._busy = True
            self._nursery.start_soon(self._serve)

    def close_if_idle(self) -> None:
        """The fast lane's call at each tick: a connection unused for idle_seconds is closed (in a
        short task; no task of the lane runs otherwise)."""
        if (self.link is not None and not self._busy and self._nursery is not None
                and trio.current_time() - self._idle_since >= self.idle_seconds):
            self._busy = True
            self._nursery.start_soon(self._close_idle)

    async def _close_idle(self) -> None:
        try:
            async with self.lock:  # not under a statement of the local lane (LeasedLink)
                if self.link is not None and trio.current_time() - self._idle_since >= self.idle_seconds:
                    log.info("source %s: %s lane idle for %gs; closing its connection", self.owner.name,
                             self.state.name, self.idle_seconds)
                    await self.close()
        finally:
            self._busy = False
            self._wake()  # work offered meanwhile

    def touch(self) -> None:
        """Its connection was used now (by this lane or over a LeasedLink)."""
        self._idle_since = trio.current_time()

    def _skip(self, name: str) -> None:
        self.state.skipped += 1
        if self._skip_warned is None:
            self._skip_warned = set()
        if name not in self._skip_warned:
            self._skip_warned.add(name)
            log.warning("source %s: metric %s: still running in the %s lane when due again; that run is skipped "
                        "(counted in status; reported once)", self.owner.name, name, self.state.name)

    async def _serve(self) -> None:
        """Run the queued jobs, then end (the connection stays open until close_if_idle)."""
        try:
            while self._queue:
                jobs = self._next_jobs()
                running = {job.metric.name for job in jobs}
                try:
                    await self._run(jobs, running)
                finally:
                    if self._pending is not None:
                        self._pending.difference_update(running)
                    self.touch()
                    self.owner.worked()  # a run's outcome may change the status file (reaper.daemon.statuswrite)
        finally:
            self._busy = False

    def _next_jobs(self) -> list[Job]:
        """The next job, with the timed jobs of its tick that share its statement (reaper.daemon.jobs) when the
        connection combines statements (a closed one is reopened for one job alone, its next run groups)."""
        job = self._next_job()
        link = self.link
        if self.lease is not None or link is None or link.is_closed or not link.combines:
            return [job]
        return take_group(job, self._queue, self.owner.timeout_share)

    def _next_job(self) -> Job:
        """The oldest tick's job under the connection's current statement_timeout, else the oldest job."""
        current = getattr(self.link, "timeout", None)  # a link that does not track it: its default
        oldest = self._queue[0].wall_ns
        for i, job in enumerate(self._queue):
            if job.wall_ns == oldest and job.timeout_ms == current:
                return self._queue.pop(i)
        return self._queue.pop(0)

    async def _run(self, jobs: list[Job], running: set[str]) -> None:
        if self.lease is not None:
            link: SourceLink = LeasedLink(self.lease)
            await self._run_on(jobs, link, running)
            return
        if all(job.given is not None for job in jobs):  # its reads rode in the fast tick (reaper.daemon.rides)
            self.count(0)
            await self._run_on(jobs, LeasedLink(self), running)  # a lease opens the connection only if used
            return
        async with self.lock:
            try:
                link = await self.ensure_link()
            except SourceUnavailable:
                return
            before = link.statements
            try:
                await self._run_on(jobs, link, running)
            finally:
                self.count(link.statements - before)

    async def _run_on(self, jobs: list[Job], link: SourceLink, running: set[str]) -> None:
        """One run: a job alone, or a group of timed jobs in one statement (each member's timeout and lost
        connection reported as when it runs alone). A group member whose run is over leaves `running` (and
        the pending set) before the others: its next run may be queued while they re-run (reaper.daemon.jobs)."""

        def settled(job: Job) -> None:
            running.discard(job.metric.name)
            if self._pending is not None:
                self._pending.discard(job.metric.name)

        self.state.runs += 1
        try:
            await (self.owner.run_job(jobs[0], link) if len(jobs) == 1
                   else run_group(self.owner, jobs, link, settled))
        except trio.TooSlowError:
            for job in jobs:
                self.owner.job_timed_out(job)
            # a statement cut off may still be running on the connection: its state is unknown. A lease that
            # was only waiting for its lender's connection (busy with another lane's job) leaves it alone.
            if not isinstance(link, LeasedLink) or link.cut:
                (self.lease or self).drop()
        except GroupAbandoned as e:
            if e.skipped:
                log.warning("source %s: %s lane: connection dropped after a metric hung; metric %s skipped this "
                            "time", self.owner.name, self.state.name, e)
            (self.lease or self).drop()
        except SourceUnavailable as e:
            owner = self.lease or self
            if owner.state.error is None:  # (a connection that cannot be opened was said once, by _open)
                log.warning("source %s: %s lane: connection lost (%s); metric %s skipped this time", self.owner.name,
                            self.state.name, e, ", ".join(job.metric.name for job in jobs))
            owner.drop()

    def count(self, statements: int) -> None:
        self.state.statements_last_run = statements
        self.state.statements_total += statements

    async def ensure_link(self) -> SourceLink:
        """This lane's connection, opened now if needed (raises SourceUnavailable, logged once per outage).
        One task opens it at a time, with what a new connection reads first (the source's server facts),
        before any statement can take it; a task that finds it being opened waits for that alone, not for
        the statement lock (the slow lane keeps that for the statement it sends next)."""
        if self.link is not None and not self.link.is_closed:
            return self.link
        if self.opener is None:
            self.opener = trio.Lock()
        async with self.opener:
            if self.link is not None and not self.link.is_closed:  # opened while this task waited
                return self.link
            return await self._open()

    async def _open(self) -> SourceLink:
        try:
            link = await self.owner.open_link()
            before = link.statements
            try:
                await self.owner.link_opened(link)
            except BaseException:
                link.terminate()
                raise
            finally:
                self.state.statements_total += link.statements - before
        except SourceUnavailable as e:
            if self.state.error is None:
                log.warning("source %s: %s lane: cannot connect (%s); its work is skipped until it can",
                            self.owner.name, self.state.name, e)
            self.state.error = str(e)
            self.state.connected = False
            raise
        self.link = link
        self.touch()
        self.state.error = None
        self.state.connected = True
        self._opens += 1  # (a server ending idle sessions would have it said at every run)
        log.log(logging.INFO if self._opens == 1 else logging.DEBUG, "source %s: %s lane connected (the source's "
                "second connection%s)", self.owner.name, self.state.name,
                "" if self._opens == 1 else f", opened {self._opens} times")
        return link

    def drop(self) -> None:
        if self.link is not None:
            self.link.terminate()
            self.link = None
        self.state.connected = False

    async def close(self) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            self.state.connected = False
            await link.close()


@asynccontextmanager
async def open_lanes(owner: LaneOwner, *, min_idle: float = MIN_IDLE_SECONDS) -> AsyncIterator[tuple[Lane, Lane]]:
    """A source's slow and local lanes (the local one over the slow one's connection), their tasks in a
    nursery around the caller's body (the fast lane); the connection is closed when it ends."""
    slow = Lane("slow", owner, min_idle=min_idle)
    local = Lane("local", owner, lease=slow, min_idle=min_idle)
    try:
        async with trio.open_nursery() as nursery:
            slow.attach(nursery)
            local.attach(nursery)
            yield slow, local
    finally:
        await slow.close()  # shielded and bounded (reaper.db.close_or_terminate)


class LeasedLink:
    """The slow lane's connection as seen by a local collector: each call takes the slow lane's lock,
    so the two never send statements at the same time, and counts in the slow lane's statements."""

    combines = False
    checks_size = False
    creates_extensions = False

    def __init__(self, lane: Lane) -> None:
        self._lane = lane
        self.statements = 0
        self.cut = False  # a call was cancelled while it had the connection (a statement may still run)

    @property
    def server(self) -> ServerInfo:
        if self._lane.link is None:
            raise SourceUnavailable("no connection")
        return self._lane.link.server

    @property
    def is_closed(self) -> bool:
        return self._lane.link is None or self._lane.link.is_closed

    @property
    def busy(self) -> bool:
        """A statement of the slow lane (or of another local collector) has the connection now."""
        return self._lane.lock.locked()

    @property
    def product(self) -> str:
        return "" if self._lane.link is None else self._lane.link.product

    async def ready(self) -> None:
        """The connection open, with what a new one reads first (its server facts): opened now, or waited
        for while another task opens it, but not for the statement that task sends next. Raises
        SourceUnavailable."""
        await self._lane.ensure_link()

    async def _call(self, op: str, *args: Any) -> Any:
        async with self._lane.lock:
            link = await self._lane.ensure_link()
            before = link.statements
            try:
                return await getattr(link, op)(*args)
            except trio.Cancelled:
                self.cut = True
                raise
            finally:
                self.statements += link.statements - before
                self._lane.count(link.statements - before)
                self._lane.touch()

    async def run_tick(self, request: TickRequest) -> TickOutcome:
        outcome: TickOutcome = await self._call("run_tick", request)
        return outcome

    async def run_one(self, name: str, query: SoloQuery) -> list[Row]:
        rows: list[Row] = await self._call("run_one", name, query)
        return rows

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        rows: list[Row] = await self._call("fetch", sql, *args)
        return rows

    async def create_extensions(self, names: Any) -> dict[str, str | None]:
        return {}

    async def close(self) -> None:
        """The connection is the slow lane's to close."""

    def terminate(self) -> None:
        """The connection is the slow lane's to drop."""
