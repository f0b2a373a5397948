"""The task of one sink: open it, write what arrives, spill during outages, set aside what it refuses.

`SinkRunner.run` reports started at once and only then opens the sink, so a sink that cannot open (a
path under /proc, a storage database that is down) never stops the daemon from starting or a reload
from being applied. Opening is retried with capped backoff; meanwhile the sink's measurements spill.

What a failure means is decided here, once, by its type:

- transient (an outage): OSError (disk full, connection refused, ...) and SinkError. The batch is kept:
  it moves to the spill queue and is retried, in order, with capped backoff. The sink's task logs ONE
  line when it starts failing and again only when the reason changes or it recovers; the reason is the
  outlet's `error`, shown by `reaper status`.
- content: anything else: SinkRejected (a storage data exception), TypeError/ValueError (a value the
  encoder cannot write) or a bug. Retrying cannot help, so the batch is split (bisected) until the
  measurements the sink refuses are found; those are set aside in `rejected/` (reaper.sinks.rejected),
  counted, and the sink goes on with the next. The first such error of each type is logged with its
  traceback, later ones with one line.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import attrs
import trio

from reaper.errors import ConfigError, SinkError, SinkRejected
from reaper.measurement import Measurement
from reaper.quiet import until_quiet
from reaper.sinks.fanout import Outlet
from reaper.sinks.rejected import describe, rejected_directory, set_aside
from reaper.sinks.spill import SpillQueue

log = logging.getLogger("reaper.sinks")

MAX_WRITE_BATCH = 500
RETRY_MAX_SECONDS = 30.0
RETRY_FIRST_SECONDS = 0.5
# a sink with gather_seconds writes each burst of work's measurements when the burst ends (a tick's come in
# 2-3 bursts: fast lane, slow lane, host collectors), up to this many writes per gather_seconds
WRITES_PER_GATHER = 4
TRANSIENT_ERRORS = (OSError, SinkError)  # an outage: kept, spilled, retried


class Sink(Protocol):
    """What a sink does. `open` runs inside the sink's task (retried while it raises); `write` gets batches
    in order and either stores the whole batch or raises: a transient error (OSError, SinkError) when the
    same batch may succeed later, anything else (SinkRejected, TypeError, ...) when its content is refused.

    A sink may have `gather_seconds`: it then writes what arrived when the burst of work that emitted it
    ends (reaper.quiet: no wake-up of its own after a tick), at most `gather_seconds` after the first
    measurement; after WRITES_PER_GATHER writes within `gather_seconds` it waits out the rest of that
    window, so a busy fleet's ticks share one write (what is in hand is written, or kept, at shutdown like
    any batch)."""

    label: str

    async def open(self, beside: trio.Nursery | None = None) -> None:
        """`beside`: a nursery inside this sink's own scope for what the sink runs next to its writes (the
        Prometheus sink's HTTP server); it lives as long as the sink's task."""

    async def write(self, batch: list[Measurement]) -> None: ...

    async def aclose(self) -> None: ...


@attrs.define(eq=False)
class SinkRunner:
    """The task of one sink: channel first (oldest), then the spill; retries without losing data."""

    sink: Sink
    receive: trio.MemoryReceiveChannel[Measurement]
    outlet: Outlet | None = None
    rejected_dir: Path | None = None  # default: next to the spill queue (<state_dir>/rejected/<sink>)
    written: int = 0
    rejected: int = 0
    error: str | None = None  # why the sink is not writing now
    _failing_since: float | None = None
    _delay: float = RETRY_FIRST_SECONDS
    _traced: set[type] = attrs.field(factory=set)  # error types already logged with a traceback
    _beside: trio.Nursery | None = None  # the sink's own nursery (run() opens it)
    _writes: deque[float] = attrs.field(factory=lambda: deque(maxlen=WRITES_PER_GATHER))  # their trio times
    _held: deque[Measurement] = attrs.field(factory=deque)  # what came while a sink without spill could not open

    def __attrs_post_init__(self) -> None:
        if self.rejected_dir is None and self.spill is not None:
            self.rejected_dir = rejected_directory(self.spill.directory)
        capacity = self.receive.statistics().max_buffer_size  # (inf only for an unbounded channel)
        self._held = deque(maxlen=max(int(min(capacity, 1 << 20)), 1))

    @property
    def spill(self) -> SpillQueue | None:
        return self.outlet.spill if self.outlet is not None else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # what the sink runs beside its writes (an HTTP server) lives in this task's own nursery: it ends
        # with the sink (aclose() stops it), and is cancelled with the sink's scope
        async with trio.open_nursery() as beside:
            self._beside = beside
            await self._run(task_status=task_status)

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()  # before opening: a sink that cannot open never holds up the daemon
        in_hand: list[Measurement] = []
        try:
            if not await self._open():
                return
            open_ = True
            in_hand = list(self._held)
            self._held.clear()
            if in_hand:
                await self._deliver(in_hand)
            while True:
                in_hand = []
                open_ = _drain(self.receive, in_hand) and open_
                if in_hand:
                    await self._deliver(in_hand)
                    in_hand = []
                    continue
                spill = self.spill
                if spill is not None and len(spill):
                    # at shutdown (the channel closed) a failing sink stops: its backlog is in the spill
                    if not await self._replay(spill) or (not open_ and self.error is not None):
                        return
                    continue
                if not open_:
                    return
                try:
                    in_hand = [await self.receive.receive()]
                except trio.EndOfChannel:
                    return
                open_ = _drain(self.receive, in_hand)
                gather = getattr(self.sink, "gather_seconds", 0.0)
                if gather > 0 and open_ and len(in_hand) < MAX_WRITE_BATCH:
                    await self._gather(gather)  # what else the burst (or a busy fleet) emits joins this write
                    open_ = _drain(self.receive, in_hand)
                await self._deliver(in_hand)
                self._writes.append(trio.current_time())
                in_hand = []
        finally:
            with trio.move_on_after(5, shield=True):
                self._save_unwritten(in_hand)
                self.receive.close()
                try:
                    await self.sink.aclose()
                except Exception as e:  # a sink that fails to close must not hide why the task ended
                    log.warning("sink %s: closing failed: %s", self.sink.label, describe(e))
            if self.spill is not None:
                self.spill.close()

    async def _gather(self, gather: float) -> None:
        """Before a write: wait for the end of the burst of work that emitted the first measurement in hand
        (at most `gather` s); after WRITES_PER_GATHER writes within `gather` s (a busy fleet), for the rest
        of that window instead, so what arrives meanwhile shares one write."""
        recent = self._writes
        rest = recent[0] + gather - trio.current_time() if len(recent) == recent.maxlen else 0.0
        if rest > 0:
            await trio.sleep(rest)
        else:
            await until_quiet(gather)

    # -- opening ---------------------------------------------------------------------------------------

    async def _open(self) -> bool:
        """Open the sink, retrying with backoff; meanwhile what arrives goes to the spill. False when the
        channel was closed (shutdown) before the sink could be opened."""
        while True:
            try:
                await self.sink.open(self._beside)
            except Exception as e:
                self._failed(e, "measurements spill meanwhile" if self.spill is not None
                             else "measurements wait in its queue meanwhile")
                if self.outlet is not None:
                    self.outlet.start_spilling("it cannot open", quiet=True)
                if not await self._wait_spilling():
                    return False
                continue
            self._recovered()
            if self.outlet is not None:
                self.outlet.opened = True
            return True

    async def _wait_spilling(self) -> bool:
        """Wait out the backoff, moving what arrives to the spill, or without one (the Prometheus sink) to
        `_held`, the newest channel-full of it. False when the channel is closed (shutdown: nothing waits
        for a sink that never opened)."""
        delay = self._next_delay()
        with trio.move_on_after(delay):
            while True:
                try:
                    m = await self.receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return False
                if self.outlet is not None and self.spill is not None:
                    self.outlet.to_spill(m)
                else:
                    self._hold(m)
        return True

    def _hold(self, m: Measurement) -> None:
        held = self._held
        if len(held) == held.maxlen and self.outlet is not None:
            self.outlet.lost += 1  # the oldest: a sink without a spill wants the latest values most
            if not self.outlet.warned_held:
                self.outlet.warned_held = True
                log.warning("sink %s: %d measurements wait for it to open: dropping the oldest (counted as "
                            "dropped)", self.sink.label, held.maxlen)
        held.append(m)

    # -- writing ---------------------------------------------------------------------------------------

    async def _deliver(self, batch: list[Measurement]) -> None:
        """Write a batch from the channel; on an outage, move it (and everything queued behind it) to the
        spill, where it is retried in order, so a crash loses nothing."""
        while batch:
            done = await self._write_or_set_aside(batch)
            batch = batch[done:]
            if not batch:
                return
            spill = self.spill
            if spill is not None and self.outlet is not None and not len(spill):
                self.outlet.start_spilling("writing failed", quiet=True)
                rest: list[Measurement] = []
                _drain_all(self.receive, rest)
                for m in batch + rest:
                    self.outlet.to_spill(m)
                return
            await trio.sleep(self._next_delay())

    async def _replay(self, spill: SpillQueue) -> bool:
        """Write the spill's oldest batch; after a failure, wait out the backoff spilling what arrives. False
        when the channel closed meanwhile (shutdown)."""
        generation = spill.generation
        taken = spill.take(MAX_WRITE_BATCH)
        readable = [m for m in taken if m is not None]
        done = await self._write_or_set_aside(readable)
        # the records resolved: the first `done` readable ones and the unreadable ones before the next
        resolved = len(taken) if done == len(readable) else _records_before(taken, done)
        unreadable = sum(1 for m in taken[:resolved] if m is None)
        if resolved:
            spill.dropped += unreadable
            spill.commit(resolved, generation)
        if done < len(readable):
            return await self._wait_spilling()
        if not len(spill) and self.outlet is not None and self.outlet.spilling:
            self.outlet.spilling = False
            log.warning("sink %s: spill queue replayed; back to direct writes", self.sink.label)
        return True

    async def _write_or_set_aside(self, batch: Sequence[Measurement]) -> int:
        """Write the batch; what the sink refuses for its content is found by bisection and set aside.
        Returns how many measurements from the front are resolved (written or set aside): fewer than the
        batch when an outage stopped it (the rest is to be retried)."""
        if not batch:
            return 0
        try:
            await self._write(batch)
        except TRANSIENT_ERRORS as e:
            self._failed(e, "measurements spill meanwhile" if self.spill is not None else "retrying the batch")
            return 0
        except Exception as e:
            if len(batch) == 1:
                self._set_aside(batch, e)
                return 1
            mid = len(batch) // 2
            done = await self._write_or_set_aside(batch[:mid])
            if done < mid:
                return done
            return mid + await self._write_or_set_aside(batch[mid:])
        self.written += len(batch)
        self._recovered()
        return len(batch)

    async def _write(self, batch: Sequence[Measurement]) -> None:
        """The sink's write, known to the outlet while under way (`reaper status` names one that does not return)."""
        if self.outlet is None:
            await self.sink.write(list(batch))
            return
        self.outlet.writing_since = trio.current_time()
        try:
            await self.sink.write(list(batch))
        finally:
            self.outlet.writing_since = None

    def _set_aside(self, batch: Sequence[Measurement], error: Exception) -> None:
        self.rejected += len(batch)
        if self.outlet is not None:
            self.outlet.rejected += len(batch)
        path = set_aside(self.rejected_dir, self.sink.label, batch, error)
        where = f"set aside in {path}" if path is not None else "logged above"
        m = batch[0]
        what = f"measurement {m.source}/{m.metric} at {m.epoch_ns}"
        if isinstance(error, SinkRejected) or type(error) in self._traced:
            log.error("sink %s: cannot store %s: %s; %s", self.sink.label, what, describe(error), where)
        else:
            self._traced.add(type(error))
            log.error("sink %s: cannot store %s (%s, not an outage: not retried); %s", self.sink.label, what,
                      describe(error), where, exc_info=error)

    # -- failure and recovery -------------------------------------------------------------------------

    def _failed(self, error: Exception, meanwhile: str) -> None:
        """Log a failure once, and again only when its reason changes."""
        reason = str(error).strip() or type(error).__name__
        if self._failing_since is None:
            self._failing_since = trio.current_time()
        if reason == self.error:
            return
        self.error = reason
        if self.outlet is not None:
            self.outlet.error = reason
        expected = isinstance(error, (*TRANSIENT_ERRORS, ConfigError, SinkRejected))
        if not expected and type(error) not in self._traced:
            self._traced.add(type(error))
            log.error("sink %s: %s; retrying every %gs at most, %s", self.sink.label, describe(error),
                      RETRY_MAX_SECONDS, meanwhile, exc_info=error)
            return
        log.error("sink %s: %s; retrying every %gs at most, %s", self.sink.label, reason, RETRY_MAX_SECONDS,
                  meanwhile)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("sink %s: writing again after %.1fs of failures", self.sink.label,
                        trio.current_time() - self._failing_since)
        self._failing_since = None
        self._delay = RETRY_FIRST_SECONDS
        self.error = None
        if self.outlet is not None:
            self.outlet.error = None

    def _next_delay(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, RETRY_MAX_SECONDS)
        return delay

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


def _records_before(taken: Sequence[Measurement | None], readable: int) -> int:
    """How many records of `taken` come before its `readable`-th readable one (unreadable ones included)."""
    seen = 0
    for index, m in enumerate(taken):
        if m is not None:
            if seen == readable:
                return index
            seen += 1
    return len(taken)


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


def _drain_all(receive: trio.MemoryReceiveChannel[Measurement], into: list[Measurement]) -> None:
    while True:
        try:
            into.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return


async def run_sink(sink: Sink, receive: trio.MemoryReceiveChannel[Measurement], outlet: Outlet | None = None,
                   *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Report ready, open the sink (retrying), then write until the channel is closed and all is written."""
    await SinkRunner(sink, receive, outlet).run(task_status=task_status)


async def write_with_retry(sink: Sink, batch: list[Measurement]) -> None:
    """Write one batch, retrying outages with capped backoff until it succeeds (or the task is cancelled);
    what the sink refuses for its content is logged and dropped (no state dir here)."""
    runner = SinkRunner(sink, trio.open_memory_channel[Measurement](0)[1])
    while batch:
        batch = batch[await runner._write_or_set_aside(batch):]
        if batch:
            await trio.sleep(runner._next_delay())
