"""reaper.daemon.alarms: the one timer that wakes the sources' ticks, under trio's MockClock (exact timing)."""

from __future__ import annotations

import trio
import trio.testing
from fakes import FakeConnector, catalog, source, sql_metric

from reaper.daemon.alarms import Alarms, Sleeper
from reaper.daemon.source import FleetControls, SourceReaper


async def test_each_event_is_set_at_its_instant_in_order(autojump_clock) -> None:
    alarms = Alarms()
    fired: list[tuple[str, float]] = []
    start = trio.current_time()

    async def waiter(name: str, event: trio.Event) -> None:
        await event.wait()
        fired.append((name, trio.current_time() - start))

    async with trio.open_nursery() as n:
        await n.start(alarms.run)
        events = {name: trio.Event() for name in "abcd"}
        for name, ev in events.items():
            n.start_soon(waiter, name, ev)
        assert alarms.wake_at(start + 7, events["a"])
        assert alarms.wake_at(start + 3, events["b"])  # earlier than the one slept for: the task re-sleeps
        assert alarms.wake_at(start + 7, events["c"])
        assert alarms.wake_at(start - 1, events["d"])  # already past: at once
        await trio.sleep(10)
        n.cancel_scope.cancel()
    # (two events set at one instant wake their tasks in an order trio chooses: compared as a set)
    assert dict(fired) == {"d": 0, "b": 3, "a": 7, "c": 7}
    assert [name for name, _ in fired][:2] == ["d", "b"]
    assert alarms.pending == 0


async def test_an_alarm_that_comes_in_while_the_task_sleeps_for_a_later_one_is_on_time(autojump_clock) -> None:
    alarms = Alarms()
    async with trio.open_nursery() as n:
        await n.start(alarms.run)
        late, soon = trio.Event(), trio.Event()
        alarms.wake_at(trio.current_time() + 100, late)
        await trio.sleep(5)  # the task now sleeps until +100
        asked = trio.current_time()
        alarms.wake_at(asked + 2, soon)
        await soon.wait()
        assert trio.current_time() - asked == 2
        assert not late.is_set()
        n.cancel_scope.cancel()


async def test_without_the_task_nothing_is_registered_and_on_stop_every_pending_alarm_is_set(autojump_clock) -> None:
    alarms = Alarms()
    assert not alarms.wake_at(trio.current_time() + 1, trio.Event())  # the caller sleeps on its own deadline
    pending = trio.Event()
    async with trio.open_nursery() as n:
        await n.start(alarms.run)
        alarms.wake_at(trio.current_time() + 1000, pending)
        await trio.sleep(1)
        n.cancel_scope.cancel()
    assert pending.is_set()  # no sleeper is left waiting for a task that is gone
    assert alarms.pending == 0
    assert not alarms.wake_at(trio.current_time() + 1, trio.Event())


async def test_a_sleeper_wakes_at_its_instant_with_or_without_the_task_and_at_once_when_poked(autojump_clock) -> None:
    for running in (True, False):
        alarms = Alarms()
        async with trio.open_nursery() as n:
            if running:
                await n.start(alarms.run)
            sleeper = Sleeper(alarms)
            t0 = trio.current_time()
            await sleeper.until(t0 + 4)
            assert trio.current_time() - t0 == 4
            n.start_soon(sleeper.until, t0 + 1000)
            await trio.sleep(3)
            sleeper.poke()  # during the sleep: it ends now
            await trio.testing.wait_all_tasks_blocked()
            assert len(n.child_tasks) == (1 if running else 0)  # only the alarms' task is left
            t1 = trio.current_time()
            await sleeper.until(t1 + 50)  # still poked (nobody cleared it): no sleep at all
            assert trio.current_time() == t1
            n.cancel_scope.cancel()


def test_sources_on_the_alarms_tick_at_the_same_instants_as_on_their_own_deadlines() -> None:
    """The same fleet, on a grid, with and without the alarms' task: the same tick times; and a config
    change wakes a sleeping source at once either way."""
    def run_fleet(with_alarms: bool):
        controls = FleetControls(phase_spread=20.0, fleet_size=40)
        made = []
        for i in range(40):
            connector = FakeConnector()
            made.append((SourceReaper(source(f"s{i}", metrics={"a": 10}), catalog(sql_metric("a"), sql_metric("b")),
                                      lambda m: None, connector=connector, wall_ns=lambda: 42, controls=controls),
                         connector))

        async def main() -> list[list[float]]:
            async with trio.open_nursery() as n:
                if with_alarms:
                    await n.start(controls.alarms.run)
                for reaper, _ in made:
                    await n.start(reaper.run)
                await trio.sleep(45)
                changed_at = trio.current_time()
                made[0][0].update(source("s0", metrics={"a": 10, "b": 3}), made[0][0].catalog)
                await trio.sleep(0.5)
                n.cancel_scope.cancel()
            first_b = next(t for t, r in made[0][1].conn.requests if "b" in r.batch)
            assert first_b - changed_at < 0.5  # the change did not wait for the next tick of 10 s
            if with_alarms:
                assert controls.alarms.pending == 0
            return [[t for t, _ in connector.conn.requests] for _, connector in made]

        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    on_alarms = run_fleet(True)
    assert on_alarms == run_fleet(False)
    assert len({ticks[0] for ticks in on_alarms}) <= 2  # the grid: 40 sources at one or two instants
    assert all(len(ticks) >= 4 for ticks in on_alarms)
