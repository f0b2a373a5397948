"""reaper.daemon.memory.GcSettler: the long-lived heap is frozen while a fleet settles (so Python's full
collections do not walk it and stall the loop), and the frozen objects are collected again periodically
(their cyclic garbage is not kept forever)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from reaper.daemon import memory
from reaper.daemon.memory import GcSettler


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_step_freezes_only_while_settling() -> None:
    settler = GcSettler(refreeze_seconds=100.0)
    settler.until = 10.0
    keep = [Cycle() for _ in range(10)]
    assert not settler.step(5.0, last_refreeze=0.0)
    assert gc.get_freeze_count() >= len(keep)
    assert settler.freezes == 1
    gc.unfreeze()
    assert not settler.step(11.0, last_refreeze=0.0)  # settled, nothing frozen: nothing to do
    assert gc.get_freeze_count() == 0 and settler.freezes == 1 and settler.refreezes == 0


def test_collections_paused_at_start_up_resume_at_the_first_freeze_even_when_not_settling() -> None:
    """`reaper run` turns automatic collections off before its imports and config; the settler's first
    wake-up freezes what is alive and turns them back on, whether or not the fleet is still settling."""
    assert gc.isenabled()
    settler = GcSettler(refreeze_seconds=100.0)
    settler.until = -1.0  # (a fleet that settled before the first wake-up)
    try:
        memory.pause_collections_until_settled()
        assert not gc.isenabled()
        start_up = [Cycle() for _ in range(10)]
        assert not settler.step(5.0, last_refreeze=0.0)
        assert gc.isenabled() and settler.freezes == 1 and gc.get_freeze_count() >= len(start_up)
        gc.unfreeze()
        assert not settler.step(10.0, last_refreeze=0.0)  # from then on as before: settled, nothing to do
        assert gc.isenabled() and settler.freezes == 1 and gc.get_freeze_count() == 0
    finally:
        memory._resume_collections()
        gc.enable()


def test_refreeze_collects_cyclic_garbage_among_frozen_objects() -> None:
    settler = GcSettler(refreeze_seconds=100.0)
    settler.until = 10.0
    garbage = Cycle()
    survivor = Cycle()
    gone, kept = weakref.ref(garbage), weakref.ref(survivor)
    settler.step(1.0, last_refreeze=0.0)  # frozen while still referenced
    del garbage
    gc.collect()
    assert gone() is not None  # a collection does not look at frozen objects
    assert not settler.step(50.0, last_refreeze=0.0)  # settled, but the refreeze period has not passed
    assert gone() is not None
    assert settler.step(150.0, last_refreeze=0.0)
    assert settler.refreezes == 1
    assert gone() is None  # the frozen cycle was collected
    assert kept() is survivor and gc.get_freeze_count() > 0  # the survivors frozen again


def _checks(settler: GcSettler, every: float, until: float, start: float = 0.0) -> float:
    """The status writer's checks (each a moment the process is awake anyway), `every` seconds."""
    now = start
    while now <= until:
        settler.due(now)
        now += every
    return now


def test_settle_extends_the_window_from_now() -> None:
    async def main() -> None:
        settler = GcSettler(freeze_seconds=5.0, refreeze_seconds=1e9)
        settler.settle(30.0)
        settler.settle(10.0)  # a shorter request does not cut a longer window
        assert settler.until == pytest.approx(trio.current_time() + 30.0)
        _checks(settler, 1.0, 61.0)  # a busy fleet: a check every second
        assert settler.freezes == 6  # at 5, 10, ... 30 s; none after
        assert settler.refreezes == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_settled_daemon_refreezes_once_an_hour_and_never_walks_the_frozen_heap(monkeypatch) -> None:
    """Settled, it refreezes once per refreeze period (a settle() freezes again, every 5 s), and it never
    calls gc.get_freeze_count(), which walks the whole permanent generation: asked every 5 s, that walk was
    most of an idle daemon's CPU. It has no task or timer: it acts at the status writer's checks."""

    def walk() -> int:
        raise AssertionError("gc.get_freeze_count() walks every frozen object")

    monkeypatch.setattr(gc, "get_freeze_count", walk)

    async def main() -> None:
        settler = GcSettler(freeze_seconds=5.0, refreeze_seconds=3600.0)
        settler.settle(30.0)
        now = _checks(settler, 1.0, 2 * 3600 + 60)
        assert settler.freezes == 6 and settler.refreezes == 2
        settler.until = now + 10.0  # a reload: settle(10.0) at `now`
        _checks(settler, 1.0, now + 10.5, start=now)
        assert settler.freezes == 9  # at its first check, then 5 and 10 s later

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_idle_daemon_checked_every_check_period_still_freezes_once_after_start_up() -> None:
    """With no work, the status writer checks every STATUS_CHECK_SECONDS: the first freeze (which turns the
    collections paused at start-up back on) comes at the first check freeze_seconds after start."""
    settler = GcSettler(freeze_seconds=5.0, refreeze_seconds=3600.0)
    try:
        memory.pause_collections_until_settled()
        settler.due(0.0)
        assert not gc.isenabled() and settler.freezes == 0  # the start-up check: too early
        settler.due(15.0)
        assert gc.isenabled() and settler.freezes == 1
        settler.due(30.0)
        assert settler.freezes == 1  # settled
    finally:
        memory._resume_collections()
        gc.enable()
