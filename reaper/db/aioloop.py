"""trio-asyncio's loop, made as cheap per callback as asyncio's own (issue 14).

trio-asyncio runs asyncio's callbacks from a trio task that takes them one at a time from a memory
channel: for EACH callback it enters a cancel scope (the next timer's deadline) and goes through a
full trio checkpoint. An asyncpg round trip is about ten callbacks (the write, the read, the future,
the task's steps), so a `select 1` cost ~100-130 us of CPU through trio-asyncio against ~70 us on
asyncio's own loop (bench/baseline.py). asyncio's loop instead runs, per iteration, every callback
that was ready when the iteration began, then polls once.

`run_ready_callbacks_in_batches` gives trio-asyncio's loop that shape: each step runs the due timers
and the callbacks queued when the step began, without a checkpoint between them, then makes one
checkpoint (trio's other tasks run, and I/O is polled); only when nothing is ready does it wait
(trio-asyncio's own step, with its cancel scope). The order is asyncio's: FIFO, a callback queued by
a callback runs in the next step, a timer when due. Measured with bench/baseline.py's loop on this
machine: ~75 us per round trip (plain asyncio ~72, trio-asyncio as shipped ~105).

A cancelled timer leaves the heap before the loop waits: trio-asyncio keeps cancelled timers until they
come due and sleeps until the earliest, so every asyncpg query's timeout (armed, then cancelled when the
answer came in time) woke an idle process once more, seconds later, for nothing; on the machines here a
wake-up costs milliseconds of CPU (reaper.quiet). asyncio's own loop skips them the same way.

`check_callbacks_only_in_debug`: asyncio checks a call_soon callback (is it a coroutine function?)
only in debug mode; trio-asyncio checks every one (inspect.iscoroutinefunction per asyncpg callback,
5 % of a fleet's CPU). Same behaviour as asyncio: the check stays on with PYTHONASYNCIODEBUG.

Both patch one loop object (the process's one loop, reaper.db.open_loop), never trio-asyncio's class,
and leave it alone when its internals are not the ones these were written for (then it simply runs as
shipped).
"""

from __future__ import annotations

import asyncio
import heapq
import types
from typing import Any

import trio

try:
    from sniffio import thread_local as _sniffio
    from trio_asyncio._handles import AsyncHandle as _AsyncHandle
except ImportError:  # another trio-asyncio: run it as shipped
    _AsyncHandle = None


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
            if isinstance(handle, _AsyncHandle):  # a trio task to start (trio-asyncio's own way)
                handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
                await handle._started.wait()
            elif not handle._cancelled:
                previous, _sniffio.name = _sniffio.name, "asyncio"
                try:
                    handle._run()
                finally:
                    _sniffio.name = previous
        if ran:
            await trio.lowlevel.checkpoint()
            return
        while timers and timers[0]._cancelled:  # a cancelled timer must not wake the loop (see the module)
            heapq.heappop(timers)
        await one()  # nothing ready: wait for a callback or the next live timer

    _main_loop_one.reaper_batched = True  # type: ignore[attr-defined]
    loop._main_loop_one = types.MethodType(_main_loop_one, loop)  # type: ignore[attr-defined]
    return True
