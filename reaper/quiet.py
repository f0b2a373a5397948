"""Follow-up work runs when the burst of work before it ends, not on a timer of its own (issue 14).

On the machines reaper runs on (shared VMs), waking an idle process costs milliseconds of CPU whatever
it then does: the same 200 dict inserts took 10.7 us hot and 2.3 ms after a 0.5 s sleep
(docs/benchmarks.md, seed section: "On these machines a wake-up costs more than the work it does").
A source's tick wakes the process anyway; what only follows it (a sink's write of the rows it emitted,
the status file's check, the heap trim) should run before the process goes back to sleep, not 0.2 s
later on a deadline of its own, which was one more wake-up for each tick.

`until_quiet(limit)` returns when no trio task can run any more (each waits for I/O, a timer or
another task) or after `limit` seconds, whichever comes first: the limit keeps a loop that never runs
dry (a large, busy fleet) from starving the caller. It is trio's own idle detection
(`wait_all_tasks_blocked`, the run loop checks it only when its run queue is empty), imported from
trio's core because `trio.testing`, which exports it, imports pytest when pytest is installed.
"""

from __future__ import annotations

import trio

try:
    from trio._core import wait_all_tasks_blocked as _wait_idle
except ImportError:  # another trio layout: the public (heavier) import
    from trio.testing import wait_all_tasks_blocked as _wait_idle


async def until_quiet(limit: float) -> None:
    """Return when every other task is blocked (the current burst of work has ended), or after `limit` s."""
    with trio.move_on_after(limit):
        await _wait_idle()
