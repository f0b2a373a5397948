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

import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import trio

from reaper import db
from reaper.config import Config, JsonFileSinkConfig, SinkConfig, SourceConfig, load_config
from reaper.errors import ConfigError
from reaper.measurement import Measurement
from reaper.metrics import Catalog
from reaper.sinks import FanOut, Sink, run_sink
from reaper.sinks.jsonfile import JsonFileSink
from reaper.source import Connector, SourceReaper, connect_source, supervise

log = logging.getLogger("reaper.app")


def build_sink(config: SinkConfig) -> Sink:
    if isinstance(config, JsonFileSinkConfig):
        return JsonFileSink(config)
    raise ConfigError([f"sink type {config.type!r} is not supported"])  # pragma: no cover


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

    def __repr__(self) -> str:
        return f"<Daemon sources={len(self.sources)} sinks={len(self.sinks)}>"

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
                self.fanout.add(sink.label, send)
                await sinks_nursery.start(run_sink, sink, receive)
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
