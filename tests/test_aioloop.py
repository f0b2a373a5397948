"""reaper.db.aioloop: trio-asyncio's loop running ready callbacks in batches keeps asyncio's order
(FIFO, a callback's own call_soon in a later step, timers when due), never starves trio's tasks, and
takes one loop step for callbacks that were queued together (counted, not timed); and that every socket's
reader runs from one task on one epoll: readers fire, stop when removed or cancelled, survive a callback's
exception and a descriptor's reuse."""

from __future__ import annotations

import asyncio
import socket

import trio
import trio.testing
import trio_asyncio
from trio_asyncio import aio_as_trio

from reaper import db
from reaper.daemon.app import count_tasks
from reaper.db.aioloop import (
    AWAITED,
    COALESCE_SECONDS,
    READERS_TASK,
    readers_on_one_epoll,
    run_ready_callbacks_in_batches,
)


class StepCounter(trio.abc.Instrument):
    """Counts the steps of one task (the loop's main task)."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


def _loop_task(suffix: str = "._main_loop") -> trio.lowlevel.Task:
    """trio-asyncio's task that runs the asyncio callbacks (or the task whose name ends with `suffix`)."""
    found = [task for task in _all_tasks() if task.name.endswith(suffix)]
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


# -- every socket's reader from one task (readers_on_one_epoll) ----------------------------------------


async def test_many_sockets_are_read_by_one_task() -> None:
    """40 sockets read through asyncio streams: one task watches them all (trio-asyncio ran one per
    socket), and each stream gets its own bytes."""
    pairs = [socket.socketpair() for _ in range(40)]
    try:
        async with db.open_loop():
            loop = asyncio.get_event_loop()
            assert readers_on_one_epoll(loop) is False  # already: not twice
            streams = [await aio_as_trio(asyncio.open_connection)(sock=a) for a, _ in pairs]
            _, io = count_tasks()
            assert io == 1
            assert not any(t.name.endswith("._io_task") for t in _all_tasks())
            for i, (_, b) in enumerate(pairs):
                b.send(b"line %d\n" % i)
            got = [await aio_as_trio(reader.readline)() for reader, _ in streams]
            assert got == [b"line %d\n" % i for i in range(40)]
            for _, writer in streams:
                writer.close()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def _all_tasks() -> list[trio.lowlevel.Task]:
    found: list[trio.lowlevel.Task] = []

    def walk(task: trio.lowlevel.Task) -> None:
        found.append(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return found


async def test_a_removed_reader_stops_and_its_descriptor_can_be_reused() -> None:
    seen: list[str] = []
    first, first_peer = socket.socketpair()
    async with db.open_loop():
        loop = asyncio.get_event_loop()
        arrived = trio.Event()

        def read(sock: socket.socket, tag: str) -> None:
            seen.append(f"{tag}:{sock.recv(100).decode()}")
            arrived.set()

        loop.add_reader(first.fileno(), read, first, "first")
        first_peer.send(b"a")
        await arrived.wait()
        assert loop.remove_reader(first.fileno()) is True
        first_peer.send(b"b")  # nobody reads it now
        fd = first.fileno()
        first.close()
        first_peer.close()
        second, second_peer = socket.socketpair()  # the lowest free descriptors: the first's again
        try:
            assert fd in (second.fileno(), second_peer.fileno())
            reader = second if second.fileno() == fd else second_peer
            other = second_peer if reader is second else second
            arrived = trio.Event()
            loop.add_reader(reader.fileno(), read, reader, "second")
            other.send(b"c")
            await arrived.wait()
            loop.remove_reader(reader.fileno())
        finally:
            second.close()
            second_peer.close()
    assert seen == ["first:a", "second:c"]


async def test_a_failing_reader_is_reported_and_the_others_go_on() -> None:
    reported: list[str] = []
    (bad, bad_peer), (good, good_peer) = socket.socketpair(), socket.socketpair()
    try:
        async with db.open_loop():
            loop = asyncio.get_event_loop()
            loop.set_exception_handler(lambda _loop, context: reported.append(str(context.get("exception"))))
            arrived = trio.Event()

            def fail() -> None:
                bad.recv(100)
                raise ValueError("a reader's bug")

            def read() -> None:
                good.recv(100)
                arrived.set()

            loop.add_reader(bad.fileno(), fail)
            loop.add_reader(good.fileno(), read)
            bad_peer.send(b"x")
            good_peer.send(b"y")
            await arrived.wait()
            for _ in range(5):  # the failing reader's turn comes in the same round or the next
                await trio.lowlevel.checkpoint()
            loop.remove_reader(bad.fileno())
            loop.remove_reader(good.fileno())
    finally:
        for s in (bad, bad_peer, good, good_peer):
            s.close()
    assert reported == ["a reader's bug"]


async def test_a_reader_cancelled_by_its_handle_is_not_run_again() -> None:
    """A handle cancelled without remove_reader, on a socket that stays readable: its callback does not
    run, and the readers' task does not spin on the ready descriptor (counted in task steps)."""
    calls = 0
    sock, peer = socket.socketpair()
    try:
        async with db.open_loop():
            loop = asyncio.get_event_loop()

            def never() -> None:
                nonlocal calls
                calls += 1

            handle = loop.add_reader(sock.fileno(), never)
            handle.cancel()
            peer.send(b"unread")  # readable from now on
            counter = StepCounter()
            counter.task = _loop_task(READERS_TASK)
            trio.lowlevel.add_instrument(counter)
            try:
                for _ in range(50):
                    await trio.lowlevel.checkpoint()
            finally:
                trio.lowlevel.remove_instrument(counter)
            loop.remove_reader(sock.fileno())
    finally:
        sock.close()
        peer.close()
    assert calls == 0
    assert counter.steps <= 3


# -- answers read together (COALESCE_SECONDS) ---------------------------------------------------------------


def test_answers_still_awaited_are_read_together_and_a_lone_one_at_once() -> None:
    """While more round trips are in flight (db.crossing) than sockets are ready, the readers wait up to
    COALESCE_SECONDS for the rest, so a group's answers take one pass of the readers (one wake-up); a lone
    round trip is read at once. Under a clock that moves only when told (clock.jump)."""
    clock = trio.testing.MockClock(rate=0)
    pairs = [socket.socketpair() for _ in range(3)]

    async def main() -> None:
        async with db.open_loop():
            loop = asyncio.get_event_loop()
            streams = [await aio_as_trio(asyncio.open_connection)(sock=a) for a, _ in pairs]
            got: dict[int, bytes] = {}

            async def ask(i: int) -> None:
                got[i] = await db.crossing(streams[i][0].readline)

            async with trio.open_nursery() as n:  # two answers awaited
                n.start_soon(ask, 0)
                n.start_soon(ask, 1)
                await trio.testing.wait_all_tasks_blocked()
                assert AWAITED.count == 2
                passes, waits = loop.reaper_passes, loop.reaper_waits
                pairs[0][1].send(b"first\n")
                await trio.testing.wait_all_tasks_blocked()
                assert got == {}  # the first answer waits for the second (the clock has not moved)
                pairs[1][1].send(b"second\n")
                clock.jump(COALESCE_SECONDS)
            assert got == {0: b"first\n", 1: b"second\n"}
            assert (loop.reaper_passes - passes, loop.reaper_waits - waits) == (1, 1)  # one pass for both
            assert AWAITED.count == 0
            passes, waits = loop.reaper_passes, loop.reaper_waits
            async with trio.open_nursery() as n:  # one awaited: read at once, without the clock moving
                n.start_soon(ask, 2)
                await trio.testing.wait_all_tasks_blocked()
                pairs[2][1].send(b"alone\n")
            assert got[2] == b"alone\n"
            assert (loop.reaper_passes - passes, loop.reaper_waits - waits) == (1, 0)
            for _, writer in streams:
                writer.close()

    try:
        trio.run(main, clock=clock)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
