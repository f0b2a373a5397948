"""The daemon: one running configuration's components and its task tree.

`Daemon` is the composition root: it builds the fan-out, the sink set, the reconciler and the
fleet switches, and `Daemon.run` is the whole task tree, readable top to bottom:

    root nursery           its own task watches the signals (given by reaper.daemon.root for `reaper run`:
    │                      SIGHUP -> reload request) until a stop is asked, then a task watches them on
    │                      through the shutdown (a second stop signal exits at once)
    ├ reconciler           the ONLY writer of running state (reaper.daemon.reconciler)
    ├ alarms               one timer for every source's next tick (reaper.daemon.alarms)
    ├ pause-file watcher   -> SetPaused requests (only while [collector] pause_file is set)
    ├ status writer        the status file when something changed, on SIGUSR2, and every 60 s
                           for the counters (reaper.daemon.statuswrite)
    └ sinks nursery        per sink: its own nursery and channel (reaper.daemon.sinkset)
      └ sources nursery    per source: supervisor + the source's lanes (reaper.daemon.source);
                           per discovery source: a task that resolves its list -> Discovered requests

Shutdown: the reconciler stops every source (their connections are closed under a shielded,
bounded scope), then the sinks' channels are closed and the sinks drain until
`shutdown_grace_seconds`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from reaper import __version__
from reaper.catalog.metrics import Catalog, load_shipped_definitions
from reaper.config.load import load_config
from reaper.config.schema import Config, SourceConfig, default_state_dir
from reaper.daemon.cache import InstanceCache
from reaper.daemon.cost import CostSettings
from reaper.daemon.installed import Installation, reload_problems
from reaper.daemon.memory import GcSettler
from reaper.daemon.plan import empty_groups, refused
from reaper.daemon.reconciler import (
    Reconciler,
    Resolver,
    RunningParent,
    RunningSource,
    SetOwned,
    SetPaused,
    Shutdown,
)
from reaper.daemon.sinkset import RunningSink, SinkSet, build_sink
from reaper.daemon.source import Connector, FleetControls, SourceReaper, connect_source
from reaper.daemon.status import DaemonStatus, ReloadRecord, SinkStatus
from reaper.daemon.statuswrite import StatusWriter
from reaper.daemon.systemd import Notifier
from reaper.db.aioloop import READERS_TASK
from reaper.db.rows import RowLimit
from reaper.errors import ConfigError
from reaper.fsutil import pause_file_notice
from reaper.kinds import resolve
from reaper.measurement import Measurement
from reaper.schedule import fleet_phase_spread
from reaper.sinks import FanOut, Sink

if TYPE_CHECKING:
    from reaper.daemon.fleet import FleetMember

__all__ = ["Daemon", "RunningParent", "RunningSink", "RunningSource", "build_sink", "count_tasks"]

log = logging.getLogger("reaper.daemon.app")

PAUSE_CHECK_SECONDS = 2.0
SETTLE_MARGIN_SECONDS = 30.0  # after the phase spread, until a started or reloaded fleet has connected
SideTask = Callable[["Daemon"], Awaitable[None]]


def count_tasks() -> tuple[int, int]:
    """Live trio tasks in this run: (all of them, those that watch the asyncio loop's sockets).

    The loop's plumbing, not reaper's own tasks: the one task that runs the readers of every socket
    (reaper.db.aioloop), and trio-asyncio's task per socket it watches otherwise (a writer while a
    socket's send buffer is full; every socket on a loop without that change)."""
    def walk(task: trio.lowlevel.Task) -> tuple[int, int]:
        total, io = 1, int(task.name.endswith("._io_task") or task.name == READERS_TASK)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                t, i = walk(child)
                total, io = total + t, io + i
        return total, io

    root = trio.lowlevel.current_root_task()
    return walk(root) if root is not None else (0, 0)


def state_dir_of(config: Config) -> Path:
    """`[collector] state_dir` (load_config fills it in), else the default for the config's file."""
    return Path(config.collector.state_dir or default_state_dir(config.path or None))


class Daemon:
    """Owns the fan-out, the sinks and the sources of one running configuration (through the
    reconciler, which alone changes them)."""

    def __init__(self, config: Config, *, connector: Connector = connect_source,
                 extra_sinks: list[Sink] | None = None, groups: Sequence[str] | None = None,
                 resolver: Resolver = resolve, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier(None)  # systemd's Type=notify (reaper.daemon.systemd); none: no-op
        self.fleet: FleetMember | None = None
        if config.fleet is not None:  # every connection names the member: `reaper:<member>`
            from reaper.daemon.fleet import FleetMember  # only with [fleet]: its session, the claim queries

            self.fleet = FleetMember(config.fleet, candidates=lambda: self.reconciler.candidates(self.config),
                                     set_owned=self._set_owned)
            if connector is connect_source:
                connector = functools.partial(connect_source, application_name=f"reaper:{self.fleet.member}")
        self.connector = connector
        RowLimit.value = config.collector.max_rows_per_metric  # (process-wide: reaper.db.rows)
        self.controls = FleetControls(min_db_size_mb=config.collector.min_db_size_mb,
                                      create_extensions=config.collector.create_extensions,
                                      cost=CostSettings.of(config.collector),
                                      rejected_dir=state_dir_of(config) / "rejected" / "sources")
        max_age = config.collector.instance_cache_max_seconds
        self.instance_cache = InstanceCache(max_age) if max_age > 0 else None
        self.fanout = FanOut()
        self._extra_sinks = list(extra_sinks or [])
        self.state_dir = state_dir_of(config)
        self.sinkset = SinkSet(self.fanout, config.collector, lambda c: build_sink(c, self), self.state_dir)
        self.reconciler = Reconciler(config, make_source=self._make_source, controls=self.controls,
                                     sinks=self.sinkset, groups=groups or (), resolver=resolver)
        self._groups = tuple(groups or ())
        self._say_empty_groups(config)
        self._stop = trio.Event()
        self._until_stop: trio.CancelScope | None = None  # the root task's watch of the signals, until a stop
        self._reloaded = trio.Event()  # set by each applied reload (the pause file's watch reads the config again)
        self._root: trio.Nursery | None = None  # the task tree's root (run): the pause file's watch starts there
        self._pause_watched = False  # a watch of the pause file runs
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload: ReloadRecord | None = None  # what the last reload did, or why it was refused
        self.started_wall = time.time()
        self.installation = Installation()  # reaper's files as found at start: a reload after an upgrade
        self.status_writer = StatusWriter(self)
        self.controls.worked = self.status_writer.poke  # after each tick and lane run (of a source)
        # freezes the long-lived heap while the fleet settles (reaper.daemon.memory): driven in the daemon's
        # process only (reaper.daemon.root), not in a test's that runs a Daemon beside other things
        self.gc = GcSettler()

    def __repr__(self) -> str:
        paused = " paused" if self.controls.paused else ""
        return f"<Daemon sources={len(self.sources)} sinks={len(self.sinks)}{paused}>"

    # -- read-only views of the reconciler's state -------------------------------------------------

    @property
    def config(self) -> Config:
        return self.reconciler.config

    @property
    def catalog(self) -> Catalog:
        return self.reconciler.catalog

    @property
    def source_configs(self) -> Sequence[SourceConfig]:
        """The sources collecting now: the configured ones this process runs, and those discovery and
        [[sources_from]] found (the Prometheus sink keeps the series of these, and only these)."""
        return tuple(running.config for running in self.reconciler.sources.values())

    @property
    def sources(self) -> dict[str, RunningSource]:
        return self.reconciler.sources

    @property
    def parents(self) -> dict[str, RunningParent]:
        return self.reconciler.parents

    @property
    def sinks(self) -> dict[str, RunningSink]:
        return self.sinkset.sinks

    def _say_empty_groups(self, config: Config) -> None:
        for group in empty_groups(config, self._groups):
            groups = sorted({s.group for s in config.sources if s.enabled})
            log.warning("--group %s: no enabled source of the configuration is in this group (its groups: %s)",
                        group, ", ".join(groups) or "none")

    def wanted_sources(self, config: Config) -> dict[str, SourceConfig]:
        return self.reconciler.wanted_sources(config)

    def _make_source(self, config: SourceConfig, catalog: Catalog) -> SourceReaper:
        return SourceReaper(config, catalog, self.emit, connector=self.connector,
                            max_backoff=self.config.collector.max_backoff_seconds, controls=self.controls,
                            instance_cache=self.instance_cache)

    def status(self, *, with_sources: bool = True) -> DaemonStatus:
        """What the status file and GET /status show (without the sources: the status writer builds those
        in chunks, reaper.daemon.statuswrite)."""
        sources = [running.reaper.status() for _, running in sorted(self.sources.items())] if with_sources else []
        sinks = [SinkStatus(label=o.label, queued=o.queued, sent=o.sent, dropped=o.dropped, spilled=o.spilled,
                            spill_bytes=o.spill_bytes, error=o.not_writing(), rejected=o.rejected)
                 for o in self.fanout.outlets]
        tasks, io_tasks = count_tasks()
        return DaemonStatus(pid=os.getpid(), version=__version__, started_wall=self.started_wall,
                            updated_wall=time.time(), config_path=self.config.path, reloads=self.reloads,
                            reload_failures=self.reload_failures, tasks=tasks, io_tasks=io_tasks,
                            running=self.reconciler.running_state(), last_reload=self.last_reload,
                            sources=tuple(sources), sinks=tuple(sinks),
                            fleet=self.fleet.status() if self.fleet is not None else None,
                            tick_lateness=self.controls.lateness.snapshot())

    def emit(self, measurement: Measurement) -> None:
        self.fanout.send(measurement)

    def request_stop(self) -> None:
        self._stop.set()
        if self._until_stop is not None:
            self._until_stop.cancel()

    @property
    def stopping(self) -> bool:
        """A stop was asked (the shutdown runs or is done)."""
        return self._stop.is_set()

    def request_status(self) -> None:
        """Write the status file now (SIGUSR2, `reaper status`)."""
        self.status_writer.request()

    def leave_fleet(self) -> bool:
        """Drain (SIGUSR1, `reaper fleet leave`): release every source, stay up. False without [fleet]."""
        if self.fleet is None:
            return False
        self.fleet.leave()
        return True

    async def _set_owned(self, owned: frozenset[str]) -> bool:
        request = SetOwned(owned)
        if not await self.reconciler.submit(request):
            return False
        await request.done.wait()
        return True

    # -- the task tree ---------------------------------------------------------------------------

    async def run(self, *, signal_task: SideTask | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until request_stop(); assumes db.open_loop() is already open."""
        grace = self.config.collector.shutdown_grace_seconds
        # a large fleet's ticks are spread wider (100 ms per source, at least PHASE_SPREAD, at most a tick),
        # on a grid that wakes ~64 sources at a time (reaper.schedule.tick_slot_seconds)
        self.controls.fleet_size = len(self.wanted_sources(self.config))
        self.controls.phase_spread = fleet_phase_spread(self.controls.fleet_size)
        self.gc.settle(self.settle_seconds())  # the first round of ticks connects every source
        listen = self.config.collector.http_listen
        health_sock = None
        if listen:  # the HTTP stack is imported only when the health endpoints are configured
            from reaper.daemon.health import bind_health, serve_health

            health_sock = bind_health(listen)  # a taken address: one ConfigError line, at once
        async with trio.open_nursery() as root:
            if health_sock is not None:  # /liveness, /readiness, /status for the daemon's whole life
                await root.start(serve_health, self, health_sock)
            await root.start(self.controls.alarms.run)  # the sources' ticks wake on it, ~64 at a time
            async with trio.open_nursery() as sinks_nursery:
                await self.sinkset.start_all(sinks_nursery, self.config.sinks, self._extra_sinks)
                try:
                    async with trio.open_nursery() as sources_nursery:
                        await root.start(self.reconciler.run, sources_nursery)
                        if self.fleet is not None:  # in the root nursery: its session ends after the sources
                            await root.start(self.fleet.run)
                        self._root = root
                        self._watch_pause_file_if_set()
                        root.start_soon(self.status_writer.run)
                        task_status.started()
                        self.notifier.ready(self.summary())
                        if self.notifier.watchdog_seconds:  # WatchdogSec=: a loop that stops turning is restarted
                            root.start_soon(self.notifier.keep_alive)
                        await self._watch_until_stop(root, signal_task)
                        await self.reconciler.submit(Shutdown())  # stops every source, closes connections
                        await self.reconciler.stopped.wait()
                finally:
                    self.fanout.close()  # the sinks drain what is queued, until the grace deadline
                    sinks_nursery.cancel_scope.deadline = trio.current_time() + grace
            if sinks_nursery.cancel_scope.cancelled_caught:
                log.error("shutdown: sinks did not finish within %gs; what they had not written is in their "
                          "spill queues for the next start", grace)
            await self.status_writer.write()
            root.cancel_scope.cancel()

    async def _watch_until_stop(self, root: trio.Nursery, signal_task: SideTask | None) -> None:
        """The root task itself watches the signals until a stop is asked (a long-lived task fewer); from then
        on a task of the root nursery watches them through the shutdown, as long as it lasts."""
        if signal_task is not None and not self._stop.is_set():
            with trio.CancelScope() as self._until_stop:
                await signal_task(self)
            self._until_stop = None
        await self._stop.wait()
        self.notifier.stopping(f"stopping: the sources, then the sinks drain (up to "
                               f"{self.config.collector.shutdown_grace_seconds:g}s)")
        if signal_task is not None:
            root.start_soon(signal_task, self)

    def settle_seconds(self) -> float:
        """How long the fleet takes to settle after a start or reload: its first ticks all come within the
        phase spread; the margin covers the connects queued behind the connect limiter."""
        return self.controls.phase_spread + SETTLE_MARGIN_SECONDS

    # -- reload ----------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        sources = self.sources
        statuses = [running.reaper.state.status for running in sources.values()]
        bad = ", ".join(f"{n} {what}" for what in ("down", "crashed") if (n := statuses.count(what)))
        return f"collecting: {len(sources)} sources{f' ({bad})' if bad else ''}, {len(self.sinks)} sinks"

    async def reload(self, path: str | Path) -> bool:
        """Apply a new config file: only a fully valid one; unchanged sources and sinks are untouched.

        The file is read and validated as a whole here; the reconciler applies it and answers. systemd hears
        RELOADING=1, then READY=1 with the outcome (reaper.daemon.systemd)."""
        self.notifier.reloading()
        applied = False
        try:
            applied = await self._reload(path)
        finally:
            if not self.stopping:
                self.notifier.ready(self.summary() if applied else "the reload was refused (see the log): running "
                                    f"the previous configuration; {self.summary()}")
        return applied

    async def _reload(self, path: str | Path) -> bool:
        load_shipped_definitions.cache_clear()  # metric and preset files are re-read too
        try:
            new = load_config(path)
        except ConfigError as e:
            return await self._refuse(path, "is invalid", e.problems)
        # what it needs of reaper's code that is not loaded yet: loadable, and of the running version
        problems = reload_problems(new, Catalog.for_config(new), self.installation)
        if problems:
            return await self._refuse(path, "cannot be applied by this daemon", problems)
        if new.fleet != self.config.fleet:
            log.warning("reload: [fleet] changes take effect at the next start")
            new = attrs.evolve(new, fleet=self.config.fleet)
        outcome = await self.reconciler.apply(new)
        if outcome is None:
            log.warning("reload: %s not applied: shutting down", path)
            return False
        self.reloads += 1
        self._reloaded.set()
        self._watch_pause_file_if_set()
        self.controls.fleet_size = len(self.wanted_sources(new))  # for sources started now on
        self.controls.phase_spread = fleet_phase_spread(self.controls.fleet_size)
        self.gc.settle(self.settle_seconds())  # new sources connect within their phase spread
        log.info("reload: applied %s: %s", path, outcome.summary())
        self._say_empty_groups(new)
        if outcome.plan is not None:
            for line in outcome.plan.lines():
                log.info("reload: %s", line)
            self.last_reload = ReloadRecord(self.reloads + self.reload_failures, time.time(), str(path), True,
                                            outcome.plan)
        await self.status_writer.write()
        return True

    async def _refuse(self, path: str | Path, why: str, problems: list[str]) -> bool:
        self.reload_failures += 1
        log.error("reload: %s %s; keeping the running configuration:", path, why)
        for line in problems:
            log.error("reload: %s", line)
        self.last_reload = ReloadRecord(self.reloads + self.reload_failures, time.time(), str(path), False,
                                        refused(problems))
        await self.status_writer.write()
        return False

    # -- pause file ------------------------------------------------------------------------------

    def _watch_pause_file_if_set(self) -> None:
        """Start the pause file's watch when [collector] pause_file is set and none runs (at start, after a
        reload): a daemon without a pause_file has no task for it."""
        path = self.config.collector.pause_file
        if path is not None and (notice := pause_file_notice(path)) is not None:
            log.warning("[collector] pause_file %s", notice)  # at every start and reload that keeps it so
        if path is not None and not self._pause_watched and self._root is not None:
            self._pause_watched = True
            self._root.start_soon(self._watch_pause_file)

    async def _watch_pause_file(self) -> None:
        """While [collector] pause_file exists, no source queries its server (checked every 2 s, and at once
        after a reload). Ends when a reload removes the pause_file (a pause it made is lifted first)."""
        paused = self.controls.paused
        while True:
            reloaded = self._reloaded = trio.Event()
            path = self.config.collector.pause_file
            exists = path is not None and await trio.Path(path).exists()
            if exists != paused:
                if not await self.reconciler.submit(SetPaused(exists)):
                    self._pause_watched = False
                    return
                paused = exists
                continue  # the config is read again after the wait: a reload may have come meanwhile
            if path is None:  # (read with no wait since: a reload that sets it again starts a new watch)
                self._pause_watched = False
                return
            with trio.move_on_after(PAUSE_CHECK_SECONDS):
                await reloaded.wait()
