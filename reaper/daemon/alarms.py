"""One sleeping task for every source's next tick (issue 14: CPU per source tick).

A source that waits for its next tick on a cancel scope of its own (`trio.move_on_at`) is woken by that
scope's deadline: trio cancels the scope and throws `Cancelled` through the source's frames, an exception
raised and caught per source per tick. A fleet's sources tick on a shared grid (reaper.schedule: ~64 at
the same instant), so one deadline per instant is enough: `Alarms.run` sleeps until the earliest
alarm and sets the trio.Event of every alarm that is due; a source parks on its own Event, which its
config change (or role change) sets as well. Measured with a lab of 64 tasks on one grid: ~15 us of CPU
per wake-up by cancel scope, ~4 by this.

Without the task running (a SourceReaper made outside a daemon: `reaper once`, tests) `wake_at` says so
and the source sleeps on its own deadline, as before.
"""

from __future__ import annotations

import heapq
import itertools
import math

import trio


class Alarms:
    """Events set at given instants of trio's clock, by one task (`run`) for the whole process."""

    __slots__ = ("_heap", "_poke", "_running", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, trio.Event]] = []
        self._seq = itertools.count()  # ties: first registered, first set (never compares two Events)
        self._poke: trio.Event | None = None  # set when an alarm earlier than the one slept for comes in
        self._running = False

    @property
    def pending(self) -> int:
        return len(self._heap)

    def wake_at(self, when: float, event: trio.Event) -> bool:
        """Set `event` at `when` (or at once when it is past). False when no task runs the alarms: the
        caller waits for `when` itself."""
        if not self._running:
            return False
        heap = self._heap
        heapq.heappush(heap, (when, next(self._seq), event))
        if heap[0][2] is event and self._poke is not None:
            self._poke.set()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Set each alarm's Event when it comes due, until cancelled; then every alarm still pending is set
        (a source woken early sees that its tick time has not come and sleeps on its own deadline)."""
        heap = self._heap
        self._running = True
        task_status.started()
        try:
            while True:
                now = trio.current_time()
                while heap and heap[0][0] <= now:
                    heapq.heappop(heap)[2].set()
                poke = self._poke = trio.Event()
                with trio.move_on_at(heap[0][0] if heap else math.inf):
                    await poke.wait()
        finally:
            self._running = False
            self._poke = None
            while heap:
                heapq.heappop(heap)[2].set()


class Sleeper:
    """One task's sleep until an instant, on the alarms (or its own deadline without them), that another
    task cuts short with `poke()` (a source's config or role change: it re-reads its intervals at once)."""

    __slots__ = ("_alarms", "_event", "poked")

    def __init__(self, alarms: Alarms) -> None:
        self._alarms = alarms
        self._event = trio.Event()
        self.poked = False  # the sleeper clears it when it has acted on it

    def poke(self) -> None:
        self.poked = True
        self._event.set()

    async def until(self, when: float) -> None:
        """Until trio's clock reaches `when`, or at once when poked (before or during the sleep)."""
        while not self.poked and trio.current_time() < when:
            event = self._event = trio.Event()
            if self._alarms.wake_at(when, event):
                await event.wait()
            else:
                with trio.move_on_at(when):
                    await event.wait()
