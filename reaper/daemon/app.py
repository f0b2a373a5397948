"""The root task tree: sinks, sources, signals, reload and shutdown.

    trio.run(cli)
    └ signal receiver (installed first)
      └ db.open_loop()                 the process's one asyncio loop
        └ root nursery                 signal task + the sinks nursery
          └ sinks nursery              one task per sink, each draining its own bounded channel
            └ sources nursery          one cancel scope + supervisor + reaper loop per source

Shutdown: sources are cancelled first (their connections closed under a shielded, bounded scope),
then the sinks' channels are closed and the sinks drain until `shutdown_grace_seconds`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import attrs
import trio

from reaper import __version__, db
from reaper.catalog.metrics import Catalog, load_shipped_definitions
from reaper.config.load import load_config
from reaper.config.schema import (
    Config,
    JsonFileSinkConfig,
    PostgresSinkConfig,
    SinkConfig,
    SourceConfig,
    default_state_dir,
)
from reaper.daemon.cache import InstanceCache
from reaper.daemon.source import Connector, FleetControls, SourceReaper, connect_source, supervise
from reaper.daemon.status import STATUS_FILE, DaemonStatus, SinkStatus, SourceStatus, percentile, write_status_file
from reaper.errors import ConfigError, SourceUnavailable
from reaper.kinds import is_discovery, resolve
from reaper.measurement import Measurement
from reaper.schedule import PHASE_SPREAD
from reaper.sinks import FanOut, Outlet, Sink, run_sink
from reaper.sinks.jsonfile import JsonFileSink
from reaper.sinks.spill import SpillQueue

log = logging.getLogger("reaper.daemon.app")


def count_tasks() -> tuple[int, int]:
    """Live trio tasks in this run: (all of them, those that are trio-asyncio's socket watchers).

    trio-asyncio runs one task per socket asyncio watches (one per database connection); they are
    the loop's plumbing, not reaper's own tasks."""
    def walk(task: trio.lowlevel.Task) -> tuple[int, int]:
        total, io = 1, int(task.name.endswith("._io_task"))
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                t, i = walk(child)
                total, io = total + t, io + i
        return total, io

    root = trio.lowlevel.current_root_task()
    return walk(root) if root is not None else (0, 0)


def build_sink(config: SinkConfig, daemon: Daemon | None = None) -> Sink:
    if isinstance(config, JsonFileSinkConfig):
        return JsonFileSink(config)
    if isinstance(config, PostgresSinkConfig):
        from reaper.sinks.postgres import PostgresSink

        return PostgresSink(config)
    from reaper.sinks.prometheus import PrometheusSink

    if daemon is None:
        return PrometheusSink(config)
    return PrometheusSink(config, catalog=lambda: daemon.catalog, sources=lambda: daemon.config.sources,
                          status=daemon.status)


@attrs.define(eq=False)
class RunningSource:
    reaper: SourceReaper
    scope: trio.CancelScope
    done: trio.Event
    parent: str | None = None  # the discovery source that found it


@attrs.define(eq=False)
class RunningParent:
    """A discovery source (postgres-discovery, patroni): it collects nothing itself; it keeps the
    list of concrete sources it stands for, refreshed every discovery_interval_seconds and on reload."""

    config: SourceConfig
    scope: trio.CancelScope
    done: trio.Event
    children: dict[str, SourceConfig] = attrs.field(factory=dict)  # the last list that could be had
    wake: trio.Event = attrs.field(factory=trio.Event)
    error: str | None = None


@attrs.define(eq=False)
class RunningSink:
    config: SinkConfig | None  # None for sinks given in code (the demo's, tests')
    sink: Sink
    outlet: Outlet
    scope: trio.CancelScope
    done: trio.Event


STATUS_EVERY_SECONDS = 5.0
PAUSE_CHECK_SECONDS = 2.0


class Daemon:
    """Owns the fan-out, the sinks and the sources of one running configuration."""

    def __init__(self, config: Config, *, connector: Connector = connect_source,
                 extra_sinks: list[Sink] | None = None, groups: Sequence[str] | None = None) -> None:
        self.config = config
        self.catalog = Catalog.for_config(config)
        self.connector = connector
        self.groups = frozenset(groups or ())
        self.controls = FleetControls(min_db_size_mb=config.collector.min_db_size_mb,
                                      create_extensions=config.collector.create_extensions)
        max_age = config.collector.instance_cache_max_seconds
        self.instance_cache = InstanceCache(max_age) if max_age > 0 else None
        self.fanout = FanOut()
        self._extra_sinks = list(extra_sinks or [])
        self.sinks: dict[str, RunningSink] = {}
        self.sources: dict[str, RunningSource] = {}
        self.parents: dict[str, RunningParent] = {}
        self._stop = trio.Event()
        self._sources_nursery: trio.Nursery | None = None
        self._sinks_nursery: trio.Nursery | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.started_wall = time.time()

    def __repr__(self) -> str:
        paused = " paused" if self.controls.paused else ""
        return f"<Daemon sources={len(self.sources)} sinks={len(self.sinks)}{paused}>"

    def wanted_sources(self, config: Config) -> dict[str, SourceConfig]:
        """The sources this process runs: enabled, and in one of --group's groups when given."""
        return {s.name: s for s in config.sources
                if s.enabled and (not self.groups or s.group in self.groups)}

    @property
    def state_dir(self) -> Path:
        return Path(self.config.collector.state_dir or default_state_dir())

    def status(self) -> DaemonStatus:
        now = trio.current_time()
        sources = []
        for name, running in sorted(self.sources.items()):
            st = running.reaper.state
            lat = sorted(st.lateness)
            sources.append(SourceStatus(
                name=name, status=st.status, ticks=st.ticks, measurements=st.measurements, rows=st.rows,
                metric_errors=st.metric_errors, degraded=tuple(sorted(st.degraded)),
                statements_last_tick=st.statements_last_tick, in_recovery=st.in_recovery,
                server_version=st.server_version, last_error=st.last_error, last_tick_wall=st.last_tick_wall,
                next_tick_in=None if st.next_tick is None else max(0.0, st.next_tick - now),
                lateness_p50=percentile(lat, 0.5), lateness_p99=percentile(lat, 0.99),
                lateness_max=lat[-1] if lat else 0.0))
        sinks = [SinkStatus(label=o.label, queued=o.queued, sent=o.sent, dropped=o.dropped, spilled=o.spilled,
                            spill_bytes=o.spill_bytes) for o in self.fanout.outlets]
        tasks, io_tasks = count_tasks()
        return DaemonStatus(pid=os.getpid(), version=__version__, started_wall=self.started_wall,
                            updated_wall=time.time(), config_path=self.config.path, reloads=self.reloads,
                            reload_failures=self.reload_failures, tasks=tasks, io_tasks=io_tasks,
                            sources=tuple(sources), sinks=tuple(sinks))

    def emit(self, measurement: Measurement) -> None:
        self.fanout.send(measurement)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until request_stop(); assumes db.open_loop() is already open."""
        grace = self.config.collector.shutdown_grace_seconds
        # a large fleet's ticks are spread wider (50 ms per source, at least PHASE_SPREAD, at most a tick)
        self.controls.phase_spread = max(PHASE_SPREAD, 0.05 * len(self.wanted_sources(self.config)))
        async with trio.open_nursery() as sinks_nursery:
            self._sinks_nursery = sinks_nursery
            for sink_config in self.config.sinks:
                await self._start_sink(build_sink(sink_config, self), sink_config)
            for sink in self._extra_sinks:
                await self._start_sink(sink, None)
            try:
                async with trio.open_nursery() as sources_nursery:
                    self._sources_nursery = sources_nursery
                    for source in self.wanted_sources(self.config).values():
                        await self.start_source(source)
                    sources_nursery.start_soon(self._watch_pause_file)
                    sources_nursery.start_soon(self._write_status_periodically)
                    log.info("collecting: %d sources, %d sinks", len(self.sources), len(self.sinks))
                    task_status.started()
                    await self._stop.wait()
                    log.info("shutting down: stopping %d sources", len(self.sources))
                    sources_nursery.cancel_scope.cancel()
            finally:
                self._sources_nursery = None
                self.fanout.close()
                sinks_nursery.cancel_scope.deadline = trio.current_time() + grace
        if sinks_nursery.cancel_scope.cancelled_caught:
            log.error("shutdown: sinks did not finish within %gs; what they had not written is in their spill "
                      "queues for the next start", grace)
        self.write_status()

    # -- sinks ---------------------------------------------------------------------------------

    async def _start_sink(self, sink: Sink, config: SinkConfig | None, outlet: Outlet | None = None,
                          receive: trio.MemoryReceiveChannel[Measurement] | None = None) -> None:
        assert self._sinks_nursery is not None
        if outlet is None or receive is None:
            send, receive = trio.open_memory_channel[Measurement](self.config.collector.queue_capacity)
            outlet = self.fanout.add(sink.label, send)
        if outlet.spill is None:
            outlet.spill = self._open_spill(sink)
            outlet.spilling = bool(outlet.spill is not None and len(outlet.spill))
        running = RunningSink(config, sink, outlet, trio.CancelScope(), trio.Event())
        self.sinks[sink.label] = running
        await self._sinks_nursery.start(self._sink_task, running, receive)

    async def _sink_task(self, running: RunningSink, receive: trio.MemoryReceiveChannel[Measurement], *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:
                await run_sink(running.sink, receive, running.outlet, task_status=task_status)
        finally:
            running.done.set()

    async def _stop_sink(self, label: str, *, replace_with: Outlet | None = None) -> None:
        """Close a sink's channel and let it drain (bounded by the shutdown grace), then forget it.

        With `replace_with`, the new outlet takes the old one's place in the fan-out first, so the
        measurements that arrive meanwhile wait in its channel for the replacement sink."""
        running = self.sinks.pop(label)
        outlets = self.fanout.outlets
        index = outlets.index(running.outlet)
        if replace_with is None:
            del outlets[index]
        else:
            outlets[index] = replace_with
        running.outlet.channel.close()
        with trio.move_on_after(self.config.collector.shutdown_grace_seconds):
            await running.done.wait()
        if not running.done.is_set():
            log.warning("sink %s: did not drain in time; the rest stays in its spill queue", label)
            running.scope.cancel()
            await running.done.wait()

    async def _apply_sinks(self, new: Config) -> tuple[int, int, int]:
        """Rebuild changed sinks after their channel drained; start added ones; stop removed ones."""
        wanted = {c.label: c for c in new.sinks}
        added = removed = rebuilt = 0
        for label, running in list(self.sinks.items()):
            if running.config is None:
                continue
            if label not in wanted:
                await self._stop_sink(label)
                removed += 1
            elif wanted[label] != running.config:
                send, receive = trio.open_memory_channel[Measurement](new.collector.queue_capacity)
                outlet = Outlet(label, send)
                await self._stop_sink(label, replace_with=outlet)
                await self._start_sink(build_sink(wanted[label], self), wanted[label], outlet, receive)
                rebuilt += 1
        for label, sink_config in wanted.items():
            if label not in self.sinks:
                await self._start_sink(build_sink(sink_config, self), sink_config)
                added += 1
        return added, removed, rebuilt

    def _open_spill(self, sink: Sink) -> SpillQueue | None:
        """The sink's on-disk spill queue under state_dir, or None (logged) when it cannot be had."""
        if not getattr(sink, "spillable", True):
            return None
        collector = self.config.collector
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", sink.label).strip("_")[:80]
        digest = hashlib.sha1(sink.label.encode()).hexdigest()[:8]
        directory = Path(collector.state_dir or default_state_dir()) / "spill" / f"{slug}-{digest}"
        spill = SpillQueue(directory, collector.spill_max_bytes)
        try:
            spill.open()
        except OSError as e:
            log.error("sink %s: no spill queue (%s): if it falls behind, its measurements are dropped "
                      "(counted)", sink.label, e)
            return None
        return spill

    # -- sources -------------------------------------------------------------------------------

    async def start_source(self, config: SourceConfig, parent: str | None = None) -> None:
        assert self._sources_nursery is not None
        if is_discovery(config):
            running_parent = RunningParent(config, trio.CancelScope(), trio.Event())
            self.parents[config.name] = running_parent
            await self._sources_nursery.start(self._parent_task, running_parent)
            return
        reaper = SourceReaper(config, self.catalog, self.emit, connector=self.connector,
                              max_backoff=self.config.collector.max_backoff_seconds, controls=self.controls,
                              instance_cache=self.instance_cache)
        running = RunningSource(reaper, trio.CancelScope(), trio.Event(), parent)
        self.sources[config.name] = running
        await self._sources_nursery.start(self._source_task, running)

    async def _source_task(self, running: RunningSource, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:
                await supervise(running.reaper, task_status=task_status)
        finally:
            running.done.set()

    async def stop_source(self, name: str, reason: str) -> None:
        """Stop a source (a discovery source: with every source it found); its connection is closed
        before this returns."""
        if name in self.parents:
            parent = self.parents.pop(name)
            parent.scope.cancel()
            await parent.done.wait()
            for child in list(parent.children):
                if child in self.sources:
                    await self.stop_source(child, reason)
            return
        running = self.sources.pop(name)
        log.info("source %s: stopping (%s)", name, reason)
        running.scope.cancel()
        await running.done.wait()

    async def _update_source(self, name: str, old: SourceConfig | None, new: SourceConfig,
                             catalog: Catalog, parent: str | None = None) -> str:
        """Apply a changed config to a running concrete source: 'restarted', 'updated' or 'unchanged'."""
        if old is not None and old.connection_settings() != new.connection_settings():
            await self.stop_source(name, "connection settings changed")
            await self.start_source(new, parent)
            return "restarted"
        if old != new or self.sources[name].reaper.catalog != catalog:
            self.sources[name].reaper.update(new, catalog)
            return "updated"
        return "unchanged"

    async def _parent_task(self, parent: RunningParent, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with parent.scope:
                task_status.started()
                while True:
                    try:
                        found = await resolve(parent.config)
                    except SourceUnavailable as e:
                        if parent.error is None:
                            log.error("source %s: discovery failed: %s; keeping the last known %d sources",
                                      parent.config.name, e, len(parent.children))
                        parent.error = str(e)
                    else:
                        if parent.error is not None:
                            log.warning("source %s: discovery works again", parent.config.name)
                        parent.error = None
                        await self._apply_children(parent, {c.name: c for c in found})
                    with trio.move_on_after(parent.config.discovery_interval_seconds):
                        await parent.wake.wait()
                    parent.wake = trio.Event()
        finally:
            parent.done.set()

    async def _apply_children(self, parent: RunningParent, found: dict[str, SourceConfig]) -> None:
        name = parent.config.name
        gone = [c for c in parent.children if c not in found]
        new = [c for c in found if c not in parent.children]
        for child in gone:
            if child in self.sources:
                await self.stop_source(child, f"no longer found by {name}")
        for child, config in found.items():
            if child in self.sources and self.sources[child].parent == name:
                await self._update_source(child, parent.children.get(child), config, self.catalog, name)
            elif child in self.sources or child in self.parents:
                log.error("source %s: found %s, but a source of that name exists already; skipped", name, child)
                continue
            else:
                await self.start_source(config, name)
        parent.children = {c: cfg for c, cfg in found.items() if self.sources.get(c) and self.sources[c].parent == name}
        if gone or new:
            log.info("source %s: %d sources (%d new, %d gone)", name, len(parent.children), len(new), len(gone))

    # -- reload --------------------------------------------------------------------------------

    async def reload(self, path: str | Path) -> bool:
        """Apply a new config file: only a fully valid one; unchanged sources and sinks are untouched."""
        load_shipped_definitions.cache_clear()  # metric and preset files are re-read too
        try:
            new = load_config(path)
        except ConfigError as e:
            self.reload_failures += 1
            log.error("reload: %s is invalid; keeping the running configuration:", path)
            for line in e.problems:
                log.error("reload: %s", line)
            self.write_status()
            return False
        self.reloads += 1
        catalog = Catalog.for_config(new)
        old_sources = self.wanted_sources(self.config)
        new_sources = self.wanted_sources(new)
        added = removed = restarted = updated = unchanged = 0
        top_level = [n for n, r in self.sources.items() if r.parent is None] + list(self.parents)
        for name in top_level:
            if name not in new_sources:
                await self.stop_source(name, "reload: removed")
                removed += 1
        sinks_added, sinks_removed, sinks_rebuilt = await self._apply_sinks(new)
        self.config, self.catalog = new, catalog
        self.controls.min_db_size_mb = new.collector.min_db_size_mb
        for name, source in new_sources.items():
            old = old_sources.get(name)
            if name in self.parents and is_discovery(source):
                parent = self.parents[name]
                if parent.config != source:
                    updated += 1
                else:
                    unchanged += 1
                parent.config = source
                parent.wake.set()  # discovery runs again at once (its children are updated from it)
            elif name in self.parents or (name in self.sources and is_discovery(source)):
                await self.stop_source(name, "reload: kind changed")
                await self.start_source(source)
                restarted += 1
            elif name not in self.sources:
                await self.start_source(source)
                added += 1
            else:
                outcome = await self._update_source(name, old, source, catalog)
                restarted += outcome == "restarted"
                updated += outcome == "updated"
                unchanged += outcome == "unchanged"
        log.info("reload: applied %s: sources %d added, %d removed, %d restarted, %d updated, %d unchanged; "
                 "sinks %d added, %d removed, %d rebuilt", path, added, removed, restarted, updated, unchanged,
                 sinks_added, sinks_removed, sinks_rebuilt)
        self.write_status()
        return True

    # -- pause file and status file --------------------------------------------------------------

    async def _watch_pause_file(self) -> None:
        """While [collector] pause_file exists, no source queries its server (checked every 2 s)."""
        while True:
            path = self.config.collector.pause_file
            paused = path is not None and await trio.Path(path).exists()
            if paused != self.controls.paused:
                self.controls.paused = paused
                if paused:
                    log.warning("pause file %s exists: every source stops querying and closes its connection "
                                "until it is removed", path)
                else:
                    log.warning("pause file removed: collection resumes")
            await trio.sleep(PAUSE_CHECK_SECONDS)

    async def _write_status_periodically(self) -> None:
        while True:
            self.write_status()
            # building it costs per source: a large fleet writes it less often (every 10 s at 1000)
            await trio.sleep(max(STATUS_EVERY_SECONDS, len(self.sources) / 100))

    def write_status(self) -> None:
        """The status file under state_dir (for `reaper status`, `reaper reload`, the benchmarks)."""
        try:
            write_status_file(self.state_dir / STATUS_FILE, self.status())
        except OSError as e:
            if not getattr(self, "_status_warned", False):
                self._status_warned = True
                log.warning("cannot write the status file in %s: %s", self.state_dir, e)


async def watch_signals(signals: AsyncIterator[int], daemon: Daemon, config_path: str | None,
                        force_exit: Callable[[int], None]) -> None:
    """SIGHUP reloads; SIGINT/SIGTERM stop gracefully; a second stop signal exits at once."""
    stopping = False
    async for signum in signals:
        if signum == signal.SIGHUP:
            if config_path is None or stopping:
                continue
            log.info("SIGHUP: reloading %s", config_path)
            await daemon.reload(config_path)
        elif not stopping:
            stopping = True
            log.info("%s: stopping gracefully (send it again to exit at once)", signal.Signals(signum).name)
            daemon.request_stop()
        else:
            log.warning("%s again: exiting at once", signal.Signals(signum).name)
            force_exit(1)


async def run_daemon(config: Config, *, config_path: str | None, force_exit: Callable[[int], None],
                     groups: Sequence[str] | None = None, pidfile: str | None = None) -> None:
    """The daemon: signal handling installed first, then the asyncio loop, then the task tree."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals, _pidfile(pidfile):
        async with db.open_loop():
            daemon = Daemon(config, groups=groups)
            async with trio.open_nursery() as root:
                root.start_soon(watch_signals, signals, daemon, config_path, force_exit)
                await daemon.run()
                root.cancel_scope.cancel()


@contextlib.contextmanager
def _pidfile(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    pid = str(os.getpid())
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(pid + "\n")
    os.replace(tmp, target)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if target.read_text().strip() == pid:
                target.unlink()
