"""The fan-out: each measurement onto every sink's outlet, never blocking and never waiting on a sink.

An `Outlet` is the fan-out's end of one sink: its bounded channel, its spill queue, and the counts and
current error that `reaper status` shows. When the channel is full, or the sink's task has started
spilling (it cannot open or write), new measurements go to the spill queue instead, in order. A
measurement that cannot be kept (no spill queue, or the disk refuses it) is counted as dropped and said
once per episode.
"""

from __future__ import annotations

import logging

import attrs
import trio

from reaper.measurement import Measurement
from reaper.sinks.spill import SpillQueue

log = logging.getLogger("reaper.sinks")
STUCK_SECONDS = 10.0  # a sink's write under way this long is shown as the reason it is not writing


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
    rejected: int = 0  # set aside in rejected/ (content the sink refuses; see SinkRunner)
    error: str | None = None  # why the sink is not writing now (cannot open, write failing), else None
    opened: bool = False  # its sink has been opened (for /readiness)
    writing_since: float | None = None  # trio time its sink's write under way began (None: no write under way)
    _warned_full: bool = False
    warned_held: bool = False  # its sink, unable to open and without a spill, dropped its oldest (said once)
    _warned_spill: bool = False  # the spill's bound was reached (said once)
    _warned_disk: bool = False  # the disk refused the spill (said once per episode)

    def not_writing(self) -> str | None:
        """Why the sink is not writing now: its error, or a write that has not returned for STUCK_SECONDS (a file
        system that does not answer, a reader that reads nothing): its queue fills and spills meanwhile."""
        if self.error is None and self.writing_since is not None:
            stuck = trio.current_time() - self.writing_since
            if stuck >= STUCK_SECONDS:
                return f"a write has not returned for {stuck:.0f}s (a file system or a reader that does not answer?)"
        return self.error

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

    def start_spilling(self, why: str, *, quiet: bool = False) -> None:
        if not self.spilling and self.spill is not None:
            self.spilling = True
            if not quiet:
                log.warning("sink %s: %s; measurements go to the spill queue in %s until it catches up",
                            self.label, why, self.spill.directory)

    def to_spill(self, measurement: Measurement) -> None:
        """Keep one measurement in the spill queue; when the disk refuses (ENOSPC), count it as dropped."""
        if self.spill is None:
            self.lost += 1
            return
        before = self.spill.dropped
        try:
            self.spill.append(measurement)
        except OSError as e:
            self.lost += 1
            if not self._warned_disk:
                self._warned_disk = True
                log.error("sink %s: cannot write the spill queue (%s): measurements for this sink are being "
                          "lost (counted as dropped)", self.label, e.strerror or e)
            return
        self.spilled += 1
        if self.spill.dropped > before and not self._warned_spill:
            self._warned_spill = True
            log.error("sink %s: spill queue full (%d bytes): dropping the oldest spilled measurements "
                      "(counted as dropped)", self.label, self.spill.max_bytes)
        if self._warned_disk:
            self._warned_disk = False
            log.warning("sink %s: the spill queue takes measurements again; %d dropped so far", self.label,
                        self.dropped)


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
