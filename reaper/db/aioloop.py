"""trio-asyncio's loop, made as cheap per callback as asyncio's own (issue 14).

trio-asyncio runs asyncio's callbacks from a trio task that takes them one at a time from a memory
channel: for EACH callback it enters a cancel scope (the next timer's deadline) and goes through a
full trio checkpoint. An asyncpg round trip is about ten callbacks (the write, the read, the future,
the task's steps), so a `select 1` cost ~100-130 us of CPU through trio-asyncio against ~70 us on
asyncio's own loop (bench/baseline.py). asyncio's loop instead runs, per iteration, every callback
that was ready when the iteration began, then polls once.

`run_ready_callbacks_in_batches` gives trio-asyncio's loop that shape: each step runs the due timers
and the callbacks queued when the step began, without a checkpoint between them, then makes one
checkpoint (trio's other tasks run, and I/O is polled); only when nothing is ready does it wait: for
the next callback alone when no timer is armed (the common case: a tick's statement has no client-side
timeout), else in trio-asyncio's own step, with its cancel scope (entering and leaving one cost ~10 us,
twice per round trip). The order is asyncio's: FIFO, a callback queued by
a callback runs in the next step, a timer when due. Measured with bench/baseline.py's loop on this
machine: ~75 us per round trip (plain asyncio ~72, trio-asyncio as shipped ~105).

A cancelled timer leaves the heap before the loop waits: trio-asyncio keeps cancelled timers until they
come due and sleeps until the earliest, so every asyncpg query's timeout (armed, then cancelled when the
answer came in time) woke an idle process once more, seconds later, for nothing; on the machines here a
wake-up costs milliseconds of CPU (reaper.quiet). asyncio's own loop skips them the same way.

`check_callbacks_only_in_debug`: asyncio checks a call_soon callback (is it a coroutine function?)
only in debug mode; trio-asyncio checks every one (inspect.iscoroutinefunction per asyncpg callback,
5 % of a fleet's CPU). Same behaviour as asyncio: the check stays on with PYTHONASYNCIODEBUG.

`readers_on_one_epoll`: trio-asyncio watches each socket asyncio reads from with a trio task of its own
(a task, its coroutine and a cancel scope: ~3-4 KB per database connection, and a wake-up of that task,
an epoll re-arm and a synchronize per answer). Here every reader of the loop is registered once, level-
triggered, in one epoll object of the loop's own, and one task waits for that epoll's descriptor and runs
the readers of all the sockets that are ready at once, then synchronizes once: when a fleet's group of
sources gets its answers, one wake-up for all of them. Measured (/tmp lab, 500 connections each sending
`select 1` together, 4 rounds, two runs): RSS 55.5 -> 53.6-54.1 MB, CPU 96 -> 67-74 us per round trip.

The readers also wait a moment for answers still to come (`COALESCE_SECONDS`): when more round trips are in
flight (`AWAITED`, counted by reaper.db.crossing) than sockets are ready, the readers' task sleeps up to 30 ms
before it reads, so that the answers of a fleet's group of sources, which the server sends one after the other
over tens or hundreds of milliseconds, are read in a few wake-ups of the process instead of one each; a lone
round trip is read at once. In a fleet, CPU per source tick is mostly the process's wake-ups (the bench's
yardstick paced like a fleet costs 2-4x the same round trip in a tight loop). Measured with
bench/profile_tick.py, ms of CPU per source tick: 300 sources of `basic` every 10 s on 30 databases, two runs
each: 0.411 / 0.417 reading at once, 0.383 / 0.394 waiting up to 3 ms, 0.356 / 0.356 up to 10 ms; later the
same day, alternating: 0.439 / 0.400 up to 10 ms, 0.383 / 0.366 up to 30 ms. 100 sources of `exhaustive` at
its own intervals (150 s windows): 0.80 at once, 0.84 / 0.84 up to 10 ms (its ~50 answers of a grid instant
come over ~0.4 s: 10 ms gathers too few), 0.72 / 0.68 up to 30 ms. Tick lateness p99 10-25 ms in every 30 ms run.

All patch one loop object (the process's one loop, reaper.db.open_loop), never trio-asyncio's class,
and leave it alone when its internals are not the ones these were written for (then it simply runs as
shipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import select
import selectors
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio

from reaper.db.failures import is_connection_error

try:
    from sniffio import thread_local as _sniffio
    from trio_asyncio._handles import AsyncHandle as _AsyncHandle
except ImportError:  # another trio-asyncio: run it as shipped
    _AsyncHandle = None

log = logging.getLogger("reaper.db")

#: how long the readers wait for more answers while more are awaited than are ready (see the module's text)
COALESCE_SECONDS = 0.03


class Awaited:
    """The round trips in flight: reaper.db.crossing counts them up and down."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


AWAITED = Awaited()


def make_cheap(loop: asyncio.AbstractEventLoop) -> None:
    """All of this module's changes, on the process's running loop (reaper.db.open_loop)."""
    check_callbacks_only_in_debug(loop)
    run_ready_callbacks_in_batches(loop)
    readers_on_one_epoll(loop)


def check_callbacks_only_in_debug(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.get_debug() and hasattr(loop, "_check_callback"):
        loop._check_callback = _no_callback_check


def _no_callback_check(callback: Any, method: str) -> None:
    return None


def run_ready_callbacks_in_batches(loop: asyncio.AbstractEventLoop) -> bool:
    """Replace the loop's per-callback step by a batched one (see the module's text). False when the
    loop is not a trio-asyncio loop with the internals this relies on (it is left as it is)."""
    one = getattr(loop, "_main_loop_one", None)
    if (_AsyncHandle is None or one is None or getattr(one, "reaper_batched", False)
            or not all(hasattr(loop, a) for a in ("_q_recv", "_timers", "_nursery"))):
        return False

    async def _main_loop_one(self: Any, no_wait: bool = False) -> None:
        if no_wait:  # trio-asyncio's shutdown and sync paths: its own step
            await one(no_wait=True)
            return
        queue = self._q_recv
        timers = self._timers
        ready = queue.statistics().current_buffer_used  # only what was queued when this step began
        ran = False
        while True:
            if timers and timers[0]._when <= self.time():
                handle = heapq.heappop(timers)
            elif ready > 0:
                ready -= 1
                handle = queue.receive_nowait()
                if isinstance(handle, asyncio.TimerHandle):
                    heapq.heappush(timers, handle)
                    continue
            else:
                break
            ran = True
            await run(self, handle)
        if ran:
            await trio.lowlevel.checkpoint()
            return
        while timers and timers[0]._cancelled:  # a cancelled timer must not wake the loop (see the module)
            heapq.heappop(timers)
        if timers:
            await one()  # nothing ready: wait for a callback or the next live timer (in a cancel scope)
            return
        handle = await queue.receive()  # nothing ready and no timer: no cancel scope to enter and leave
        if isinstance(handle, asyncio.TimerHandle):
            heapq.heappush(timers, handle)
        else:
            await run(self, handle)

    async def run(self: Any, handle: Any) -> None:
        if isinstance(handle, _AsyncHandle):  # a trio task to start (trio-asyncio's own way)
            handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
            await handle._started.wait()
        elif not handle._cancelled:
            previous, _sniffio.name = _sniffio.name, "asyncio"
            try:
                handle._run()
            finally:
                _sniffio.name = previous

    _main_loop_one.reaper_batched = True  # type: ignore[attr-defined]
    loop._main_loop_one = types.MethodType(_main_loop_one, loop)  # type: ignore[attr-defined]
    return True


#: the name of the task that runs the readers of every socket (reaper.daemon.app.count_tasks: plumbing)
READERS_TASK = "reaper.db.aioloop.readers"


class _ReaderHandle(asyncio.Handle):
    """A reader's handle; `_scope` only for trio-asyncio's shutdown, which looks for one (None: no task)."""

    __slots__ = ("_scope",)

    def __init__(self, callback: Any, args: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(callback, args, loop, None)
        self._scope = None


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


def readers_on_one_epoll(loop: asyncio.AbstractEventLoop, coalesce: float | None = None) -> bool:
    """Run the loop's socket readers from one task on one epoll (see the module's text). False when the
    platform has no epoll or the loop is not a running trio-asyncio loop with the internals this relies on
    (it is left as it is: a task per socket)."""
    if (not hasattr(select, "epoll") or getattr(loop, "reaper_readers", False) or _AsyncHandle is None
            or getattr(loop, "_nursery", None) is None
            or not all(hasattr(loop, a) for a in ("_selector", "_add_reader", "_remove_reader", "synchronize"))):
        return False
    epoll = select.epoll()
    wait = COALESCE_SECONDS if coalesce is None else coalesce  # (read now: a lab may set the module's value)
    readers: dict[int, _ReaderHandle] = {}
    remove = loop._remove_reader  # type: ignore[attr-defined]  # asyncio's: the selector's key, cancel the handle

    def watch(fd: int) -> None:
        try:
            epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            epoll.modify(fd, select.EPOLLIN)

    def unwatch(fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed already (the kernel dropped it), or the epoll
            epoll.unregister(fd)

    def _add_reader(self: Any, fileobj: Any, callback: Any, *args: Any) -> _ReaderHandle:
        self._check_closed()
        handle = _ReaderHandle(callback, args, self)
        try:
            key = self._selector.get_key(fileobj)
        except KeyError:
            self._selector.register(fileobj, selectors.EVENT_READ, (handle, None))
            old = None
        else:
            old, writer = key.data
            self._selector.modify(fileobj, key.events | selectors.EVENT_READ, (handle, writer))
        if old is not None:
            old.cancel()
        fd = _fd(fileobj)
        watch(fd)
        readers[fd] = handle
        return handle

    def _remove_reader(self: Any, fileobj: Any) -> bool:
        fd = _fd(fileobj)
        if readers.pop(fd, None) is not None:
            unwatch(fd)
        return bool(remove(fileobj))

    async def run_readers() -> None:
        fileno = epoll.fileno()
        try:
            while True:
                await trio.lowlevel.wait_readable(fileno)
                if wait > 0 and AWAITED.count > 1 and len(epoll.poll(0)) < AWAITED.count:
                    await trio.sleep(wait)  # more answers are coming: read them in the same wake-up
                    loop.reaper_waits += 1  # type: ignore[attr-defined]
                ran = False
                for fd, _ in epoll.poll(0):
                    handle = readers.get(fd)
                    if handle is None or handle._cancelled:  # cancelled without remove_reader: stop watching
                        if handle is not None:
                            del readers[fd]
                        unwatch(fd)
                        continue
                    previous, _sniffio.name = _sniffio.name, "asyncio"
                    try:
                        handle._run()  # (asyncio's Handle reports a callback's exception to the loop)
                    finally:
                        _sniffio.name = previous
                    ran = True
                if ran:  # what the readers queued runs before they are asked again (as trio-asyncio does)
                    loop.reaper_passes += 1  # type: ignore[attr-defined]
                    await loop.synchronize()  # type: ignore[attr-defined]
        finally:
            epoll.close()

    loop._add_reader = types.MethodType(_add_reader, loop)  # type: ignore[attr-defined]
    loop._remove_reader = types.MethodType(_remove_reader, loop)  # type: ignore[attr-defined]
    loop._nursery.start_soon(run_readers, name=READERS_TASK)  # type: ignore[attr-defined]
    loop.reaper_readers = True  # type: ignore[attr-defined]
    loop.reaper_passes = loop.reaper_waits = 0  # type: ignore[attr-defined]  # passes that ran readers; waits
    return True


LOOKUP_THREADS = 64  # asyncio's worker threads at once: asyncpg's name lookups (getaddrinfo), nothing else


class AbandoningExecutor(trio_asyncio.TrioExecutor):
    """asyncio's run_in_executor in a trio worker thread that a cancel leaves behind (its result dropped).

    asyncpg looks a host name up with getaddrinfo in such a thread, and trio-asyncio's own executor waits for
    the thread when cancelled: a name whose DNS server does not answer held the source's connect for the
    resolver's whole timeout and retries (`connect_timeout_seconds` did not bound it), and the lookups took
    trio's shared worker threads, which the sinks' file opens need too. An abandoned thread keeps its slot of
    this executor's own limiter until its lookup ends, so the threads stay bounded."""

    def __init__(self) -> None:
        super().__init__(limiter=trio.CapacityLimiter(LOOKUP_THREADS))

    async def submit(self, func: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(func, *args, limiter=self._limiter, abandon_on_cancel=True)


@asynccontextmanager
async def open_loop() -> AsyncIterator[None]:
    """The process's one asyncio loop, opened outermost around the whole task tree."""
    async with trio_asyncio.open_loop() as loop:
        tolerate_abandoned_connection_futures(loop)
        make_cheap(loop)
        loop.set_default_executor(AbandoningExecutor())
        yield


def tolerate_abandoned_connection_futures(loop: asyncio.AbstractEventLoop) -> None:
    """Keep one asyncpg quirk from crashing the daemon: a connection dying mid-operation can leave a future
    failing with a connection error that no one retrieves (`copy_in` when a shutdown races the COPY); asyncio
    reports it to the loop's handler, and trio-asyncio makes such a report an exception of the whole loop. The
    caller already handled the failure: only that report is logged (debug); every other goes on as before."""
    previous = loop.get_exception_handler()
    if getattr(previous, "reaper_tolerant", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is not None and is_connection_error(exc) and "never retrieved" in str(context.get("message", "")):
            log.debug("ignored an abandoned asyncpg future of a lost connection: %s", exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.reaper_tolerant = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
