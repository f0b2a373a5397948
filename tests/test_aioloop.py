"""reaper.db.aioloop: trio-asyncio's loop running ready callbacks in batches keeps asyncio's order
(FIFO, a callback's own call_soon in a later step, timers when due), never starves trio's tasks, and
takes one loop step for callbacks that were queued together (counted, not timed)."""

from __future__ import annotations

import asyncio

import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from reaper import db
from reaper.db.aioloop import run_ready_callbacks_in_batches


class StepCounter(trio.abc.Instrument):
    """Counts the steps of one task (the loop's main task)."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


def _loop_task() -> trio.lowlevel.Task:
    """trio-asyncio's task that runs the asyncio callbacks."""
    found = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.endswith("._main_loop"):
            found.append(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    assert len(found) == 1, found
    return found[0]


async def test_the_process_loop_is_batched_once() -> None:
    async with db.open_loop():
        loop = asyncio.get_event_loop()
        assert getattr(loop._main_loop_one, "reaper_batched", False)  # type: ignore[attr-defined]
        assert run_ready_callbacks_in_batches(loop) is False  # already: not wrapped twice


async def test_order_is_asyncio_s_fifo_with_chained_callbacks_after() -> None:
    order: list[str] = []

    async def schedule() -> list[str]:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def a() -> None:
            order.append("a")
            loop.call_soon(c)

        def b() -> None:
            order.append("b")

        def c() -> None:
            order.append("c")
            loop.call_soon(done.set_result, None)

        loop.call_soon(a)
        loop.call_soon(b)
        await done
        return order

    async with db.open_loop():
        assert await aio_as_trio(schedule)() == ["a", "b", "c"]


async def test_timers_fire_in_due_order_between_callbacks() -> None:
    async def schedule() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        done = loop.create_future()

        def late() -> None:
            seen.append("late")
            done.set_result(None)

        loop.call_later(0.02, late)
        loop.call_later(0.01, seen.append, "early")
        loop.call_soon(seen.append, "now")
        await done
        return seen

    async with db.open_loop():
        assert await aio_as_trio(schedule)() == ["now", "early", "late"]


async def test_a_callback_that_reschedules_itself_forever_does_not_starve_trio() -> None:
    """An asyncio callback chain that never ends: trio's tasks still run (each loop step is followed
    by a checkpoint), so a trio task can finish its work and stop the chain."""

    with trio.fail_after(30):  # a starved trio would never get here: fail rather than hang
        await _spin_while_trio_runs()


async def _spin_while_trio_runs() -> None:
    spins = 0
    stop = False

    async with db.open_loop():
        loop = asyncio.get_event_loop()

        def spin() -> None:
            nonlocal spins
            spins += 1
            if not stop:
                loop.call_soon(spin)

        loop.call_soon(spin)
        for _ in range(50):
            await trio.lowlevel.checkpoint()
        stop = True
        assert spins > 0


async def test_callbacks_queued_together_run_in_one_step() -> None:
    """200 callbacks queued at once: the shipped loop took one step (and a checkpoint) per callback;
    batched, the loop's task takes a handful of steps for all of them."""
    counter = StepCounter()

    async def queue_many(n: int) -> int:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        ran: list[int] = []
        for i in range(n):
            loop.call_soon(ran.append, i)
        loop.call_soon(done.set_result, None)
        await done
        return len(ran)

    async with trio_asyncio.open_loop() as loop:
        assert run_ready_callbacks_in_batches(loop)
        counter.task = _loop_task()
        trio.lowlevel.add_instrument(counter)
        try:
            assert await aio_as_trio(queue_many)(200) == 200
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert 0 < counter.steps <= 10


async def test_a_cancelled_timer_does_not_wake_the_loop(autojump_clock) -> None:
    """asyncpg arms a timer for a query's timeout and cancels it when the answer comes in time:
    trio-asyncio kept it and woke its loop when it came due, for nothing (one wake-up of an idle daemon
    per query). The loop's task takes no step while only cancelled timers are pending."""
    counter = StepCounter()

    async def arm_and_cancel() -> None:
        loop = asyncio.get_running_loop()
        timeout = loop.call_later(10, lambda: None)
        await asyncio.sleep(0)
        timeout.cancel()

    async with trio_asyncio.open_loop() as loop:
        assert run_ready_callbacks_in_batches(loop)
        await aio_as_trio(arm_and_cancel)()
        await trio.sleep(1)  # the loop settles: it waits for a callback or its next timer
        counter.task = _loop_task()
        trio.lowlevel.add_instrument(counter)
        try:
            await trio.sleep(30)  # past the cancelled timer's due time
        finally:
            trio.lowlevel.remove_instrument(counter)
        late: list[str] = []
        await aio_as_trio(_call_later_and_wait)(late)
        assert late == ["fired"]  # a live timer still fires
    assert counter.steps == 0


async def _call_later_and_wait(seen: list[str]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_later(5, lambda: (seen.append("fired"), done.set_result(None)))
    await done
