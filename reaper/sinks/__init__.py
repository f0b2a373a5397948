"""Sinks: one task per sink, each draining its own bounded channel; the fan-out feeds them all.

A source hands a measurement to `FanOut.send`, which never blocks and never waits on a sink: it
puts the measurement on every sink's bounded memory channel. When a sink falls behind (its channel
is full) or fails to write, its measurements go to that sink's on-disk spill queue instead
(`[collector] state_dir`, bounded by `spill_max_bytes`), in order; the sink replays the spill
before it takes new data again, and a restarted reaper replays what is on disk. Only when the
spill bound is reached are the oldest measurements dropped: counted, logged once per episode, and
exposed. No other sink and no source is slowed.
"""

from __future__ import annotations

import logging
from typing import Protocol

import attrs
import trio

from reaper.errors import SinkError
from reaper.measurement import Measurement
from reaper.sinks.spill import SpillQueue

log = logging.getLogger("reaper.sinks")

MAX_WRITE_BATCH = 500
RETRY_MAX_SECONDS = 30.0
SINK_ERRORS = (OSError, ValueError, TypeError, SinkError)


class Sink(Protocol):
    """What a sink does. `open` runs before the sink's task reports ready; `write` gets batches in
    order and either stores the whole batch or raises (the same batch is then retried)."""

    label: str

    async def open(self) -> None: ...

    async def write(self, batch: list[Measurement]) -> None: ...

    async def aclose(self) -> None: ...


@attrs.define(eq=False)
class Outlet:
    """The fan-out's end of one sink: its channel, its spill queue, and what happened to its data."""

    label: str
    channel: trio.MemorySendChannel[Measurement]
    spill: SpillQueue | None = None
    spilling: bool = False  # new measurements go to the spill (to keep order) until it is replayed
    sent: int = 0
    spilled: int = 0
    lost: int = 0
    _warned_full: bool = False
    _warned_spill: bool = False

    @property
    def queued(self) -> int:
        return self.channel.statistics().current_buffer_used

    @property
    def dropped(self) -> int:
        return self.lost + (self.spill.dropped if self.spill is not None else 0)

    @property
    def spill_bytes(self) -> int:
        return self.spill.bytes if self.spill is not None else 0

    def put(self, measurement: Measurement) -> None:
        if self.spilling:
            self.to_spill(measurement)
            return
        try:
            self.channel.send_nowait(measurement)
        except trio.WouldBlock:
            if self.spill is None:
                self.lost += 1
                if not self._warned_full:
                    self._warned_full = True
                    log.warning("sink %s: queue full (%d measurements) and no spill queue: dropping new "
                                "measurements for this sink until it catches up", self.label,
                                self.channel.statistics().max_buffer_size)
                return
            self.start_spilling("its queue is full")
            self.to_spill(measurement)
            return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.lost += 1
            return
        self.sent += 1
        if self._warned_full:
            self._warned_full = False
            log.warning("sink %s: caught up; %d measurements dropped so far", self.label, self.dropped)

    def start_spilling(self, why: str) -> None:
        if not self.spilling:
            self.spilling = True
            log.warning("sink %s: %s; measurements go to the spill queue in %s until it catches up",
                        self.label, why, self.spill.directory if self.spill else "?")

    def to_spill(self, measurement: Measurement) -> None:
        assert self.spill is not None
        before = self.spill.dropped
        try:
            self.spill.append(measurement)
        except OSError as e:
            self.lost += 1
            if not self._warned_spill:
                self._warned_spill = True
                log.error("sink %s: cannot write the spill queue (%s): measurements for this sink are being "
                          "lost", self.label, e)
            return
        self.spilled += 1
        if self.spill.dropped > before and not self._warned_spill:
            self._warned_spill = True
            log.error("sink %s: spill queue full (%d bytes): dropping the oldest spilled measurements",
                      self.label, self.spill.max_bytes)


@attrs.define(eq=False)
class FanOut:
    """Puts each measurement on every sink's outlet without ever blocking the caller."""

    outlets: list[Outlet] = attrs.field(factory=list)

    def add(self, label: str, channel: trio.MemorySendChannel[Measurement],
            spill: SpillQueue | None = None) -> Outlet:
        outlet = Outlet(label, channel, spill=spill, spilling=bool(spill is not None and len(spill)))
        self.outlets.append(outlet)
        return outlet

    def send(self, measurement: Measurement) -> None:
        for outlet in self.outlets:
            outlet.put(measurement)

    def close(self) -> None:
        for outlet in self.outlets:
            outlet.channel.close()


def _drain(receive: trio.MemoryReceiveChannel[Measurement], batch: list[Measurement]) -> bool:
    """Move what is queued into batch (up to the batch size). Returns False once the channel is closed
    and empty."""
    while len(batch) < MAX_WRITE_BATCH:
        try:
            batch.append(receive.receive_nowait())
        except trio.WouldBlock:
            return True
        except trio.EndOfChannel:
            return False
    return True


@attrs.define(eq=False)
class SinkRunner:
    """The task of one sink: channel first (oldest), then the spill; retries without losing data."""

    sink: Sink
    receive: trio.MemoryReceiveChannel[Measurement]
    outlet: Outlet | None = None
    written: int = 0
    _failing_since: float | None = None
    _delay: float = 0.5

    @property
    def spill(self) -> SpillQueue | None:
        return self.outlet.spill if self.outlet is not None else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sink.open()
        in_hand: list[Measurement] = []
        try:
            task_status.started()
            open_ = True
            while True:
                in_hand = []
                open_ = _drain(self.receive, in_hand) and open_
                if in_hand:
                    await self._deliver(in_hand)
                    in_hand = []
                    continue
                spill = self.spill
                if spill is not None and len(spill):
                    await self._replay(spill)
                    continue
                if not open_:
                    return
                try:
                    in_hand = [await self.receive.receive()]
                except trio.EndOfChannel:
                    return
                open_ = _drain(self.receive, in_hand)
                await self._deliver(in_hand)
                in_hand = []
        finally:
            with trio.move_on_after(5, shield=True):
                self._save_unwritten(in_hand)
                self.receive.close()
                await self.sink.aclose()
            if self.spill is not None:
                self.spill.close()

    async def _deliver(self, batch: list[Measurement]) -> None:
        """Write a batch from the channel; on failure, move it (and everything queued behind it) to the
        spill, where it is retried in order, so a crash loses nothing."""
        while True:
            if await self._try_write(batch):
                return
            spill = self.spill
            if spill is not None and self.outlet is not None and not len(spill):
                self.outlet.start_spilling("writing failed")
                rest: list[Measurement] = []
                _drain_all(self.receive, rest)
                for m in batch + rest:
                    self.outlet.to_spill(m)
                return
            await self._backoff()

    async def _replay(self, spill: SpillQueue) -> None:
        batch = spill.peek(MAX_WRITE_BATCH)
        if not await self._try_write(batch):
            await self._backoff()
            return
        spill.commit(len(batch))
        if not len(spill) and self.outlet is not None and self.outlet.spilling:
            self.outlet.spilling = False
            log.warning("sink %s: spill queue replayed; back to direct writes", self.sink.label)

    async def _try_write(self, batch: list[Measurement]) -> bool:
        try:
            await self.sink.write(batch)
        except SINK_ERRORS as e:
            if self._failing_since is None:
                self._failing_since = trio.current_time()
                log.error("sink %s: write failed: %s; retrying with backoff, nothing is dropped", self.sink.label, e)
            return False
        self.written += len(batch)
        if self._failing_since is not None:
            log.warning("sink %s: writing again after %.1fs of failures", self.sink.label,
                        trio.current_time() - self._failing_since)
            self._failing_since = None
            self._delay = 0.5
        return True

    async def _backoff(self) -> None:
        await trio.sleep(self._delay)
        self._delay = min(self._delay * 2, RETRY_MAX_SECONDS)

    def _save_unwritten(self, in_hand: list[Measurement]) -> None:
        """At shutdown: what was not written goes to the spill (replayed by the next start)."""
        if self.outlet is None or self.spill is None:
            return
        unwritten = list(in_hand)
        _drain_all(self.receive, unwritten)
        if unwritten:
            for m in unwritten:
                self.outlet.to_spill(m)
            log.warning("sink %s: %d unwritten measurements saved to the spill queue for the next start",
                        self.sink.label, len(unwritten))


def _drain_all(receive: trio.MemoryReceiveChannel[Measurement], into: list[Measurement]) -> None:
    while True:
        try:
            into.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return


async def run_sink(sink: Sink, receive: trio.MemoryReceiveChannel[Measurement], outlet: Outlet | None = None,
                   *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Open the sink, report ready, then write until the channel is closed and everything is written."""
    await SinkRunner(sink, receive, outlet).run(task_status=task_status)


async def write_with_retry(sink: Sink, batch: list[Measurement]) -> None:
    """Write one batch, retrying with capped backoff until it succeeds (or the task is cancelled)."""
    runner = SinkRunner(sink, trio.open_memory_channel[Measurement](0)[1])
    while not await runner._try_write(batch):
        await runner._backoff()
