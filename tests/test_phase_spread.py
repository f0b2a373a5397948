"""A fleet's phase spread (reaper.schedule.fleet_phase_spread): a lone source's first tick comes within a few
seconds of its start; a big fleet's first ticks are spread over its whole tick, never beyond it."""

from __future__ import annotations

from collections import Counter

from reaper.schedule import PHASE_SPREAD, Schedule, fleet_phase_spread, phase_seconds


def test_a_few_sources_start_within_the_default_spread() -> None:
    assert fleet_phase_spread(1) == PHASE_SPREAD
    assert fleet_phase_spread(10) == PHASE_SPREAD
    assert all(phase_seconds(f"s{i}", 60, fleet_phase_spread(1)) < PHASE_SPREAD for i in range(200))


def test_a_big_fleet_is_spread_over_its_whole_tick_and_no_further() -> None:
    spread = fleet_phase_spread(1000)
    assert spread >= 60
    phases = [phase_seconds(f"s{i + 1:04d}", 60, spread) for i in range(1000)]
    assert all(0 <= p < 60 for p in phases)
    per_10s = Counter(int(p // 10) for p in phases)
    assert sorted(per_10s) == [0, 1, 2, 3, 4, 5]  # every sixth of the tick has first ticks in it
    assert max(per_10s.values()) < 2 * 1000 / 6  # and none holds twice its share


def test_the_spread_never_pushes_a_first_tick_past_one_tick() -> None:
    spread = fleet_phase_spread(100_000)
    for tick_intervals in ({"a": 1}, {"a": 15, "b": 30}, {"a": 300}):
        for i in range(100):
            sched = Schedule.starting(1000.0, f"src{i}", tick_intervals, spread)
            _, when = sched.next_tick(1000.0)
            assert 1000.0 <= when < 1000.0 + sched.tick
