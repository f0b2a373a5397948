"""The running sinks: starting, stopping and rebuilding them, each in its own scope.

Only the reconciler calls `apply` (a reload) and the daemon's task tree calls `start_all` once, so
there is one writer of `sinks`. Each sink runs in its own nursery inside the daemon's sinks nursery:

    sinks nursery
    └ sink <label>              its own cancel scope and bounded channel
      └ the sink's runner       open (retried by the runner), write, retry, spill; its own nursery holds
        └ (an HTTP server)      what the sink runs beside its writes (reaper.sinks.runner gives it to open())

A sink is registered only once its task has started. A changed sink is rebuilt after its channel
drained (bounded by `shutdown_grace_seconds`); meanwhile the fan-out already puts new measurements
on the replacement's channel, so nothing is lost between the two.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import attrs
import trio

from reaper.catalog.metrics import Catalog
from reaper.config.schema import (
    CollectorConfig,
    JsonFileSinkConfig,
    PostgresSinkConfig,
    SinkConfig,
    SourceConfig,
)
from reaper.daemon.status import DaemonStatus
from reaper.measurement import Measurement
from reaper.sinks import FanOut, Outlet, Sink, run_sink
from reaper.sinks.jsonfile import JsonFileSink
from reaper.sinks.spill import SpillQueue

log = logging.getLogger("reaper.daemon.sinkset")


class DaemonView(Protocol):
    """What a sink may read of the daemon (the Prometheus sink serves the catalogue and the status)."""

    @property
    def catalog(self) -> Catalog: ...

    @property
    def source_configs(self) -> Sequence[SourceConfig]: ...

    def status(self) -> DaemonStatus: ...


def build_sink(config: SinkConfig, daemon: DaemonView | None = None) -> Sink:
    if isinstance(config, JsonFileSinkConfig):
        return JsonFileSink(config)
    if isinstance(config, PostgresSinkConfig):
        from reaper.sinks.postgres import PostgresSink

        return PostgresSink(config)
    from reaper.sinks.prometheus import PrometheusSink

    if daemon is None:
        return PrometheusSink(config)
    view = daemon
    return PrometheusSink(config, catalog=lambda: view.catalog, sources=lambda: view.source_configs,
                          status=view.status)


@attrs.define(eq=False)
class RunningSink:
    config: SinkConfig | None  # None for sinks given in code (the demo's, tests')
    sink: Sink
    outlet: Outlet
    scope: trio.CancelScope
    done: trio.Event


SinkBuilder = Callable[[SinkConfig], Sink]


class SinkSet:
    """The sinks of one daemon, keyed by label, and their outlets in the fan-out."""

    def __init__(self, fanout: FanOut, collector: CollectorConfig, build: SinkBuilder, state_dir: Path) -> None:
        self.fanout = fanout
        self.state_dir = state_dir  # spill queues live under it (fixed for the daemon's life)
        self.collector = collector  # queue capacity, spill settings, drain grace (updated on reload)
        self.build = build
        self.sinks: dict[str, RunningSink] = {}
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<SinkSet {', '.join(self.sinks) or 'empty'}>"

    async def start_all(self, nursery: trio.Nursery, configs: Sequence[SinkConfig], extra: Sequence[Sink]) -> None:
        """Start the configured sinks and the ones given in code, in `nursery` (the sinks nursery)."""
        self._nursery = nursery
        for config in configs:
            await self._start(self.build(config), config)
        for sink in extra:
            await self._start(sink, None)
        used = {self._spill_dir(label) for label in self.sinks}
        for directory in sorted((self.state_dir / "spill").glob("*")) if (self.state_dir / "spill").is_dir() else ():
            size = sum(p.stat().st_size for p in directory.glob("*.seg")) if directory not in used else 0
            if size:
                log.warning("%s holds %d bytes of measurements of a sink no longer configured: configuring it "
                            "again delivers them (or delete the folder)", directory, size)

    async def apply(self, wanted_configs: Sequence[SinkConfig], collector: CollectorConfig) -> tuple[int, int, int]:
        """Stop removed sinks, rebuild changed ones after their channel drained, start added ones:
        (added, removed, rebuilt). Sinks given in code are left alone."""
        self.collector = collector
        wanted = {c.label: c for c in wanted_configs}
        added = removed = rebuilt = 0
        heirs = _heirs([r.config for r in self.sinks.values() if r.config is not None and r.config.label not in wanted],
                       [c for c in wanted_configs if c.label not in self.sinks])
        for label, running in list(self.sinks.items()):
            if running.config is None:
                continue
            heir = heirs.get(label)
            if label not in wanted and heir is None:
                await self._stop(label)
                self._hand_over(running.outlet.spill, None)
                removed += 1
            elif heir is not None or wanted[label] != running.config:
                # rebuilt, or replaced by its heir: what arrives meanwhile waits in the new channel
                new = heir or label
                send, receive = trio.open_memory_channel[Measurement](collector.queue_capacity)
                outlet = Outlet(new, send)
                await self._stop(label, replace_with=outlet)
                if heir is not None:
                    self._hand_over(running.outlet.spill, heir)
                await self._start(self.build(wanted[new]), wanted[new], outlet, receive)
                if heir is not None:
                    removed, added = removed + 1, added + 1
                else:
                    rebuilt += 1
        for label, config in wanted.items():
            if label not in self.sinks:
                await self._start(self.build(config), config)
                added += 1
        return added, removed, rebuilt

    # -- one sink --------------------------------------------------------------------------------

    async def _start(self, sink: Sink, config: SinkConfig | None, outlet: Outlet | None = None,
                     receive: trio.MemoryReceiveChannel[Measurement] | None = None) -> None:
        assert self._nursery is not None, "start_all() first"
        if outlet is None or receive is None:
            send, receive = trio.open_memory_channel[Measurement](self.collector.queue_capacity)
            outlet = self.fanout.add(sink.label, send)
        if outlet.spill is None:
            outlet.spill = self._open_spill(sink)
            outlet.spilling = bool(outlet.spill is not None and len(outlet.spill))
        running = RunningSink(config, sink, outlet, trio.CancelScope(), trio.Event())
        await self._nursery.start(self._sink_task, running, receive)
        self.sinks[sink.label] = running  # registered only once started

    async def _sink_task(self, running: RunningSink, receive: trio.MemoryReceiveChannel[Measurement], *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:  # the runner's own nursery (an HTTP server) lives and dies inside this scope
                await run_sink(running.sink, receive, running.outlet, task_status=task_status)
        finally:
            running.done.set()

    async def _stop(self, label: str, *, replace_with: Outlet | None = None) -> None:
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
        with trio.move_on_after(self.collector.shutdown_grace_seconds):
            await running.done.wait()
        if not running.done.is_set():
            log.warning("sink %s: did not drain in time; the rest stays in its spill queue", label)
            running.scope.cancel()
            await running.done.wait()

    def _spill_dir(self, label: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:80]
        return self.state_dir / "spill" / f"{slug}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"

    def _hand_over(self, spill: SpillQueue | None, heir: str | None) -> None:
        """What a removed sink had not written (its spill queue, closed now) goes to the sink that replaces it
        (the reload removed one sink of its type and added one: a path or dsn fixed), else stays on disk, said."""
        if spill is None or not len(spill):
            return
        target = self._spill_dir(heir) if heir is not None else None
        if target is not None and not any(target.glob("*.seg")):
            try:
                if target.exists():
                    shutil.rmtree(target)
                spill.directory.rename(target)
            except OSError as e:
                log.error("sink %s: cannot hand its spill queue to %s (%s)", spill.directory.name, heir, e)
            else:
                log.warning("sink %s takes over the %d measurements its predecessor had not written", heir, len(spill))
                return
        log.warning("a removed sink left %d measurements it had not written in %s: adding it back delivers them",
                    len(spill), spill.directory)

    def _open_spill(self, sink: Sink) -> SpillQueue | None:
        """The sink's on-disk spill queue under state_dir, or None (logged) when it cannot be had."""
        if not getattr(sink, "spillable", True):
            return None
        collector = self.collector
        spill = SpillQueue(self._spill_dir(sink.label), collector.spill_max_bytes)
        try:
            spill.open()
        except OSError as e:
            log.error("sink %s: no spill queue (%s): if it falls behind, its measurements are dropped "
                      "(counted)", sink.label, e)
            return None
        return spill


def _heirs(removed: Sequence[SinkConfig], added: Sequence[SinkConfig]) -> dict[str, str]:
    """Removed sink label -> the added sink that replaces it: for each type, when a reload removes exactly one
    sink of it and adds exactly one."""
    heirs = {}
    for kind in {type(c) for c in removed}:
        gone, new = [c for c in removed if type(c) is kind], [c for c in added if type(c) is kind]
        if len(gone) == 1 and len(new) == 1:
            heirs[gone[0].label] = new[0].label
    return heirs
