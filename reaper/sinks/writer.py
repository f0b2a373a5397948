"""One long-lived thread per file sink for its blocking file work: a file system that hangs holds up that sink only.

A write to a local file takes microseconds, until the file system stops answering: an NFS server gone, a
file system frozen for a snapshot (fsfreeze, LVM), a dying disk. Written from the trio thread, such a write
stopped the whole daemon: every source's ticks and every other sink waited for it. Here the sink's task
waits alone; its queue fills and spills to disk meanwhile, and it catches up when the file system is back.

One thread for the sink's whole life, not a worker per write: trio's idle workers expire between bursts
(a 60 s interval's) and were made again for every one. Calls run one at a time, in order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
SETTLE_SECONDS = 5.0  # a write under way when its sink is stopped may end this long after (and then counts)

_Job = tuple[Callable[..., Any], tuple[Any, ...], list[outcome.Outcome[Any]], trio.lowlevel.TrioToken, trio.Event]


class WriterThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def call(self, fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
        """fn(*args) in the thread. Cancelled meanwhile: with `abandon` the call is left to end alone (a pipe
        whose reader lags: the caller keeps its data for later); else it is waited for up to SETTLE_SECONDS
        more, and when it ends then its result counts (a file's write done is not to be written again)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        done, box = trio.Event(), list[outcome.Outcome[Any]]()
        self._jobs.put((fn, args, box, trio.lowlevel.current_trio_token(), done))
        if abandon:
            await done.wait()
        else:
            try:
                await done.wait()
            except trio.Cancelled:
                with trio.move_on_after(SETTLE_SECONDS) as settle:
                    settle.shield = True
                    await done.wait()
                if not done.is_set():
                    raise
        result: outcome.Outcome[T] = box[0]
        return result.unwrap()

    def close(self) -> None:
        """The thread ends once the calls before this one have (at once when it is idle)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, box, token, done = job
            box.append(outcome.capture(fn, *args))
            try:
                trio.from_thread.run_sync(done.set, trio_token=token)
            except trio.RunFinishedError:  # the daemon has ended meanwhile
                return
