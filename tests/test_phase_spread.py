"""A fleet's phase spread (reaper.schedule.fleet_phase_spread): a lone source's first tick comes within a few
seconds of its start; a big fleet's first ticks are spread over its whole tick, never beyond it."""

from __future__ import annotations

from collections import Counter

import pytest

from reaper.schedule import PHASE_SPREAD, SOURCES_PER_SLOT, Schedule, fleet_phase_spread, phase_seconds


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


def test_a_fleet_ticks_by_groups_on_a_grid_and_still_within_one_spread() -> None:
    """reaper.schedule.tick_slot_seconds: ~SOURCES_PER_SLOT sources share each tick instant (a wake-up with
    warm caches), and the grid never pushes a first tick past the spread (nor past one tick)."""
    fleets = ((1000, {"a": 60}), (100, {"a": 60, "b": 300}), (20, {"a": 30}), (16, {"a": 60}), (300, {"a": 15}))
    for sources, tick_intervals in fleets:
        spread = fleet_phase_spread(sources)
        starts = [999.37 + i * 0.001 for i in range(sources)]  # started one after the other
        firsts = []
        for i, now in enumerate(starts):
            sched = Schedule.starting(now, f"s{i + 1:04d}", tick_intervals, spread, sources)
            k, when = sched.next_tick(now)
            assert now <= when < now + min(sched.tick, spread), (sources, i)
            assert sched.tick_time(k + 1) - when == pytest.approx(sched.tick)
            firsts.append(when)
        instants = Counter(round(w, 6) for w in firsts)
        # (a grid step may fall inside the start-up)
        assert len(instants) <= max(1, round(sources / SOURCES_PER_SLOT)) + 1
        if sources >= 2 * SOURCES_PER_SLOT:
            assert max(instants.values()) <= 2 * SOURCES_PER_SLOT  # groups, not one burst


def test_a_small_fleet_ticks_at_one_instant_and_a_lone_source_at_its_phase() -> None:
    """Under SOURCES_PER_SLOT sources the whole fleet shares one grid instant (one wake-up of the process per tick, not
    one per source), still within one spread of the start; a lone source keeps its own phase."""
    spread = fleet_phase_spread(6)
    firsts = {Schedule.starting(999.37, f"s{i}", {"a": 30}, spread, 6).next_tick(999.37)[1] for i in range(6)}
    assert len(firsts) == 1
    assert 999.37 <= firsts.pop() < 999.37 + spread
    alone = {Schedule.starting(999.37, f"s{i}", {"a": 30}, spread, 1).next_tick(999.37)[1] for i in range(6)}
    assert len(alone) == 6
