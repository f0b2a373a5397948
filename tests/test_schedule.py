"""Tick and due arithmetic (pure)."""

from __future__ import annotations

import math

import pytest

from reaper.schedule import IDLE_TICK, Schedule, phase_seconds, tick_seconds


@pytest.mark.parametrize(("intervals", "tick"), [
    ({"a": 30, "b": 60, "c": 300}, 30),
    ({"a": 60, "b": 300}, 60),
    ({"a": 7, "b": 13}, 1),
    ({"a": 45}, 45),
    ({"a": 0, "b": 20}, 20),
    ({}, IDLE_TICK),
    ({"a": 0}, IDLE_TICK),
])
def test_tick_is_gcd_of_active_intervals(intervals: dict[str, int], tick: int) -> None:
    assert tick_seconds(intervals) == tick


def test_phase_is_stable_and_inside_the_tick() -> None:
    assert phase_seconds("main", 30) == phase_seconds("main", 30)
    phases = {phase_seconds(f"db{i}", 30) for i in range(100)}
    assert all(0 <= p < 5 for p in phases)  # the first tick comes within seconds of the start
    assert len(phases) > 50  # and a fleet is spread, not fired in one instant
    assert all(0 <= phase_seconds(f"db{i}", 2) < 2 for i in range(100))


def run(sched: Schedule, ticks: int, work: float = 0.0) -> list[tuple[float, list[str]]]:
    """Take `ticks` ticks, each finishing `work` seconds after it started."""
    out = []
    now = sched.origin
    for _ in range(ticks):
        k, t = sched.next_tick(now)
        out.append((t - sched.origin, sched.take(k)))
        now = t + work
    return out


def test_metrics_are_due_on_a_regular_grid_from_the_first_tick() -> None:
    sched = Schedule(origin=1000.0, tick=10)
    sched.set_intervals({"a": 10, "b": 20, "c": 30})
    assert run(sched, 7) == [
        (0, ["a", "b", "c"]), (10, ["a"]), (20, ["a", "b"]), (30, ["a", "c"]),
        (40, ["a", "b"]), (50, ["a"]), (60, ["a", "b", "c"]),
    ]


def test_combinations_repeat_with_a_short_period() -> None:
    sched = Schedule.starting(0.0, "src", {"a": 30, "b": 60, "c": 120, "d": 300})
    combos = {tuple(due) for _, due in run(sched, 200)}
    assert len(combos) <= 6


def test_overrun_skips_missed_ticks_without_a_burst() -> None:
    sched = Schedule(origin=0.0, tick=10)
    sched.set_intervals({"a": 10, "b": 30})
    k, t = sched.next_tick(0.0)
    assert sched.take(k) == ["a", "b"]
    # the work of tick 0 took 35 s: ticks 1..3 are skipped, the next is tick 4 at 40 s
    k, t = sched.next_tick(35.0)
    assert (k, t) == (4, 40.0)
    assert sched.take(k) == ["a", "b"]  # b was due at 30 (missed) and is taken once, not twice
    k, t = sched.next_tick(40.5)
    assert (k, t) == (5, 50.0)
    assert sched.take(k) == ["a"]
    k, t = sched.next_tick(50.2)
    assert (t, sched.take(k)) == (60.0, ["a", "b"])  # b keeps its grid: 0, 30 (taken late at 40), 60, 90
    k, t = sched.next_tick(60.2)
    assert (t, sched.take(k)) == (70.0, ["a"])


def test_never_repeats_a_tick_even_when_the_clock_is_early() -> None:
    sched = Schedule(origin=0.0, tick=5)
    sched.set_intervals({"a": 5})
    k0, _ = sched.next_tick(0.0)
    sched.take(k0)
    k1, t1 = sched.next_tick(0.0)
    assert k1 == k0 + 1 and t1 == 5.0


def test_new_metric_is_due_at_the_next_tick_and_others_keep_their_grid() -> None:
    sched = Schedule(origin=0.0, tick=10)
    sched.set_intervals({"a": 10, "b": 30})
    assert run(sched, 2) == [(0, ["a", "b"]), (10, ["a"])]
    assert sched.set_intervals({"a": 10, "b": 30, "c": 20})
    k, t = sched.next_tick(10.0)
    assert (t, sched.take(k)) == (20.0, ["a", "c"])
    k, t = sched.next_tick(20.0)
    assert (t, sched.take(k)) == (30.0, ["a", "b"])
    k, t = sched.next_tick(30.0)
    assert (t, sched.take(k)) == (40.0, ["a", "c"])


def test_unchanged_intervals_report_no_change() -> None:
    sched = Schedule(origin=0.0, tick=10)
    assert sched.set_intervals({"a": 10})
    assert not sched.set_intervals({"a": 10})
    assert not sched.set_intervals({"a": 10, "off": 0})


def test_interval_change_rebases_the_grid_and_counts_from_the_last_run() -> None:
    sched = Schedule(origin=0.0, tick=30)
    sched.set_intervals({"a": 30, "b": 60})
    assert run(sched, 3) == [(0, ["a", "b"]), (30, ["a"]), (60, ["a", "b"])]
    # b: 60 -> 20 s. The tick becomes gcd(30, 20) = 10, re-based at the last tick taken (60 s).
    assert sched.set_intervals({"a": 30, "b": 20})
    assert sched.tick == 10
    assert sched.origin == 60.0
    seen = []
    now = 60.0
    for _ in range(6):
        k, t = sched.next_tick(now)
        seen.append((t, sched.take(k)))
        now = t
    assert seen == [(70.0, []), (80.0, ["b"]), (90.0, ["a"]), (100.0, ["b"]), (110.0, []), (120.0, ["a", "b"])]


def test_removed_metric_is_never_due_again() -> None:
    sched = Schedule(origin=0.0, tick=10)
    sched.set_intervals({"a": 10, "b": 10})
    run(sched, 1)
    sched.set_intervals({"a": 10})
    k, _ = sched.next_tick(0.0)
    assert sched.take(k) == ["a"]


def test_next_due_is_never_nan() -> None:
    sched = Schedule.starting(12.5, "x", {"a": 60, "b": 3600})
    run(sched, 100, work=3.0)
    assert all(math.isfinite(v) for v in sched.next_due.values())
