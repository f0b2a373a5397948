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

import hashlib
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import trio

from reaper import __version__, db
from reaper.config import (
    Config,
    JsonFileSinkConfig,
    PostgresSinkConfig,
    SinkConfig,
    SourceConfig,
    default_state_dir,
    load_config,
)
from reaper.errors import ConfigError
from reaper.measurement import Measurement
from reaper.metrics import Catalog
from reaper.sinks import FanOut, Sink, run_sink
from reaper.sinks.jsonfile import JsonFileSink
from reaper.sinks.spill import SpillQueue
from reaper.source import Connector, SourceReaper, connect_source, supervise
from reaper.status import DaemonStatus, SinkStatus, SourceStatus, percentile

log = logging.getLogger("reaper.app")


def count_tasks() -> int:
    """Live trio tasks in this run (from the root task down)."""
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    return walk(root) if root is not None else 0


def build_sink(config: SinkConfig) -> Sink:
    if isinstance(config, JsonFileSinkConfig):
        return JsonFileSink(config)
    if isinstance(config, PostgresSinkConfig):
        from reaper.sinks.postgres import PostgresSink

        return PostgresSink(config)
    from reaper.sinks.prometheus import PrometheusSink

    return PrometheusSink(config)


@attrs.define(eq=False)
class RunningSource:
    reaper: SourceReaper
    scope: trio.CancelScope
    done: trio.Event


class Daemon:
    """Owns the fan-out, the sinks and the sources of one running configuration."""

    def __init__(self, config: Config, *, connector: Connector = connect_source,
                 extra_sinks: list[Sink] | None = None) -> None:
        self.config = config
        self.catalog = Catalog.for_config(config)
        self.connector = connector
        self.fanout = FanOut()
        self.sinks: list[Sink] = [build_sink(s) for s in config.sinks] + list(extra_sinks or [])
        self.sources: dict[str, RunningSource] = {}
        self._stop = trio.Event()
        self._sources_nursery: trio.Nursery | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.started_wall = time.time()

    def __repr__(self) -> str:
        return f"<Daemon sources={len(self.sources)} sinks={len(self.sinks)}>"

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
        return DaemonStatus(pid=os.getpid(), version=__version__, started_wall=self.started_wall,
                            updated_wall=time.time(), config_path=self.config.path, reloads=self.reloads,
                            reload_failures=self.reload_failures, tasks=count_tasks(),
                            sources=tuple(sources), sinks=tuple(sinks))

    def emit(self, measurement: Measurement) -> None:
        self.fanout.send(measurement)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until request_stop(); assumes db.open_loop() is already open."""
        capacity = self.config.collector.queue_capacity
        grace = self.config.collector.shutdown_grace_seconds
        async with trio.open_nursery() as sinks_nursery:
            for sink in self.sinks:
                send, receive = trio.open_memory_channel[Measurement](capacity)
                outlet = self.fanout.add(sink.label, send, self._open_spill(sink))
                await sinks_nursery.start(run_sink, sink, receive, outlet)
            try:
                async with trio.open_nursery() as sources_nursery:
                    self._sources_nursery = sources_nursery
                    for source in self.config.sources:
                        if source.enabled:
                            await self.start_source(source)
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
            log.error("shutdown: sinks did not drain within %gs; %d measurements not written", grace,
                      sum(o.queued for o in self.fanout.outlets))

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

    async def start_source(self, config: SourceConfig) -> None:
        assert self._sources_nursery is not None
        reaper = SourceReaper(config, self.catalog, self.emit, connector=self.connector,
                              max_backoff=self.config.collector.max_backoff_seconds)
        running = RunningSource(reaper, trio.CancelScope(), trio.Event())
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
        running = self.sources.pop(name)
        log.info("source %s: stopping (%s)", name, reason)
        running.scope.cancel()
        await running.done.wait()

    # -- reload --------------------------------------------------------------------------------

    async def reload(self, path: str | Path) -> bool:
        """Apply a new config file: only a fully valid one; unchanged sources are untouched."""
        try:
            new = load_config(path)
        except ConfigError as e:
            self.reload_failures += 1
            log.error("reload: %s is invalid; keeping the running configuration:", path)
            for line in e.problems:
                log.error("reload: %s", line)
            return False
        self.reloads += 1
        if new.sinks != self.config.sinks or new.collector != self.config.collector:
            log.warning("reload: sink and [collector] changes take effect after a restart")
        catalog = Catalog.for_config(new)
        old_sources = {s.name: s for s in self.config.sources if s.enabled}
        new_sources = {s.name: s for s in new.sources if s.enabled}
        added = removed = restarted = updated = unchanged = 0
        for name in list(self.sources):
            if name not in new_sources:
                await self.stop_source(name, "reload: removed")
                removed += 1
        self.config, self.catalog = new, catalog
        for name, source in new_sources.items():
            old = old_sources.get(name)
            if name not in self.sources:
                await self.start_source(source)
                added += 1
            elif old is not None and old.connection_settings() != source.connection_settings():
                await self.stop_source(name, "reload: connection settings changed")
                await self.start_source(source)
                restarted += 1
            elif old != source or self.sources[name].reaper.catalog != catalog:
                self.sources[name].reaper.update(source, catalog)
                updated += 1
            else:
                unchanged += 1
        log.info("reload: applied %s: %d added, %d removed, %d restarted, %d updated, %d unchanged",
                 path, added, removed, restarted, updated, unchanged)
        return True


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


async def run_daemon(config: Config, *, config_path: str | None,
                     force_exit: Callable[[int], None]) -> None:
    """The daemon: signal handling installed first, then the asyncio loop, then the task tree."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with db.open_loop():
            daemon = Daemon(config)
            async with trio.open_nursery() as root:
                root.start_soon(watch_signals, signals, daemon, config_path, force_exit)
                await daemon.run()
                root.cancel_scope.cancel()
