"""Sinks: one task per sink, each draining its own bounded channel; the fan-out feeds them all.

A source hands a measurement to `FanOut.send`, which never blocks: it puts the measurement on every
sink's channel. A full channel means that sink is behind: the measurement is dropped for that sink
only, counted, and logged once per episode (a later issue replaces the drop with an on-disk spill).
"""

from __future__ import annotations

import logging
from typing import Protocol

import attrs
import trio

from reaper.measurement import Measurement

log = logging.getLogger("reaper.sinks")

MAX_WRITE_BATCH = 500
RETRY_MAX_SECONDS = 30.0


class Sink(Protocol):
    """What a sink does. `open` runs before the sink's task reports ready; `write` gets a batch in order."""

    label: str

    async def open(self) -> None: ...

    async def write(self, batch: list[Measurement]) -> None: ...

    async def aclose(self) -> None: ...


@attrs.define(eq=False)
class Outlet:
    label: str
    channel: trio.MemorySendChannel[Measurement]
    sent: int = 0
    dropped: int = 0
    overflowing: bool = False

    @property
    def queued(self) -> int:
        return self.channel.statistics().current_buffer_used


@attrs.define(eq=False)
class FanOut:
    """Puts each measurement on every sink's bounded channel without ever blocking the caller."""

    outlets: list[Outlet] = attrs.field(factory=list)

    def add(self, label: str, channel: trio.MemorySendChannel[Measurement]) -> Outlet:
        outlet = Outlet(label, channel)
        self.outlets.append(outlet)
        return outlet

    def send(self, measurement: Measurement) -> None:
        for outlet in self.outlets:
            try:
                outlet.channel.send_nowait(measurement)
            except trio.WouldBlock:
                outlet.dropped += 1
                if not outlet.overflowing:
                    outlet.overflowing = True
                    log.warning("sink %s: queue full (%d measurements), dropping new measurements for this "
                                "sink until it catches up", outlet.label,
                                outlet.channel.statistics().max_buffer_size)
                continue
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                outlet.dropped += 1
                continue
            outlet.sent += 1
            if outlet.overflowing:
                outlet.overflowing = False
                log.warning("sink %s: caught up; %d measurements dropped so far", outlet.label, outlet.dropped)

    def close(self) -> None:
        for outlet in self.outlets:
            outlet.channel.close()


async def run_sink(sink: Sink, receive: trio.MemoryReceiveChannel[Measurement],
                   *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Open the sink, report ready, then write batches until the channel is closed and drained."""
    await sink.open()
    try:
        task_status.started()
        async with receive:
            async for first in receive:
                batch = [first]
                while len(batch) < MAX_WRITE_BATCH:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await write_with_retry(sink, batch)
    finally:
        with trio.move_on_after(5, shield=True):
            await sink.aclose()


async def write_with_retry(sink: Sink, batch: list[Measurement]) -> None:
    """Write a batch, retrying with capped backoff until it succeeds (or the task is cancelled).

    The batch stays in hand while the sink is failing, so nothing is lost to a transient error;
    meanwhile the sink's channel fills and the fan-out counts what it cannot queue.
    """
    delay = 0.5
    failing_since: float | None = None
    while True:
        try:
            await sink.write(batch)
        except (OSError, ValueError, TypeError) as e:
            if failing_since is None:
                failing_since = trio.current_time()
                log.error("sink %s: write failed: %s; retrying with backoff (batch of %d kept)",
                          sink.label, e, len(batch))
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
            continue
        if failing_since is not None:
            log.warning("sink %s: writing again after %.1fs of failures", sink.label,
                        trio.current_time() - failing_since)
        return
