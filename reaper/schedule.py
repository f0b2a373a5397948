"""Tick and due-metric arithmetic for one source. Pure: no clock, no I/O.

A source wakes at fixed-rate ticks `origin + k * tick`, where `tick` is the GCD of its active
intervals (at least 1 s) and `origin` is its start time plus a stable per-source phase. Every
metric carries its own next due time on that grid: a metric with interval `i` is due at every
`i / tick`-th tick counted from the tick it was first scheduled at, so the sets of metrics due
together repeat with a short period (few distinct combined statements per source) and samples
land on a regular grid. A tick whose work overruns skips the ticks it missed: never a burst.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import attrs

MIN_TICK = 1
IDLE_TICK = 60  # how often a source with no active metric still wakes up
PHASE_SPREAD = 5.0  # default: sources start within this many seconds of each other (and stay spread by it)
PHASE_SPREAD_PER_SOURCE = 0.1  # a fleet's spread grows with it, up to a whole tick (phase_seconds' bound)
SOURCES_PER_SLOT = 64  # about this many sources of a fleet share each tick instant (tick_slot_seconds)


def tick_seconds(intervals: Mapping[str, int]) -> int:
    """GCD of the active (positive) intervals, floored at one second; IDLE_TICK when none."""
    active = [max(MIN_TICK, int(i)) for i in intervals.values() if i > 0]
    if not active:
        return IDLE_TICK
    return max(MIN_TICK, math.gcd(*active))


def fleet_phase_spread(sources: int) -> float:
    """The phase spread of a fleet of `sources`: a few seconds for a few sources (a source's first tick soon
    after start), 100 ms more per source, so that a big fleet's first ticks, each a connect and a few cold
    round trips, are spread over its whole tick (phase_seconds caps the spread at the tick): 1000 sources
    at a 60 s tick start ~17 a second, not the 20 of a 50 s spread."""
    return max(PHASE_SPREAD, PHASE_SPREAD_PER_SOURCE * sources)


def phase_seconds(name: str, tick: int, spread: float = PHASE_SPREAD) -> float:
    """A stable offset in [0, min(tick, spread)) from the source's name, so a fleet does not fire in
    the same instant, while a source's first tick still comes soon after its start."""
    spread_ms = max(1, int(min(tick, spread) * 1000))
    return (zlib.crc32(name.encode()) % spread_ms) / 1000.0


def tick_slot_seconds(tick: int, spread: float, sources: int) -> float:
    """The grid on which a source's ticks start, so that about SOURCES_PER_SLOT sources of a fleet of `sources`
    tick at the same instant (0: no grid). A source's tick is a wake-up of the process that runs with cold CPU
    caches when it runs alone: ticks spread one by one over the whole tick (1000 sources at 60 s: one every
    60 ms) cost twice the CPU of the same ticks woken by 16 at a time (bench/profile_tick.py: 2.21 vs 1.25 ms
    per source tick), and by 64 a quarter less again (400 sources of `basic` every 5 s, two runs each: 0.51 ms
    per source tick by 16, 0.40 by 48, 0.37 by 128). A tick woken with others starts at most the others' first
    steps later (a fraction of a millisecond each, before their statements are sent): tick lateness p99 5-10
    ms by 16 and by 48, 25 ms by 128 (the issue's bound: 50 ms), and ~1 MB more RSS per 400 sources (more
    ticks' rows in memory at once). A fleet smaller than SOURCES_PER_SLOT ticks at one instant: the seed's 6
    `debug` sources, spread over 5 s, woke the process 12 times a minute; woken together, 2 (bench seed, same
    host, back to back: 5.49 instead of 7.12 ms per source tick, 0.78x the peer's CPU per series instead of
    0.96x, for 2 MB more RSS, the six ticks' rows being in memory at the
    same time). A lone source (or an unknown fleet: 0) has no grid."""
    if spread <= 0 or sources < 2:
        return 0.0
    return min(tick, spread) / max(1, round(sources / SOURCES_PER_SLOT))  # a whole number of slots in the spread


@attrs.define
class Schedule:
    """The tick grid of one source and the next due time of each of its metrics."""

    origin: float
    tick: int
    intervals: dict[str, int] = attrs.field(factory=dict)
    next_due: dict[str, float] = attrs.field(factory=dict)
    last_due: dict[str, float] = attrs.field(factory=dict)
    k: int = -1  # index of the last tick taken

    @classmethod
    def starting(cls, now: float, name: str, intervals: Mapping[str, int],
                 spread: float = PHASE_SPREAD, fleet: int = 0) -> Schedule:
        """The schedule of a source starting at `now`: its first tick after its phase in the fleet's spread,
        moved on to the fleet's tick grid (tick_slot_seconds) when `fleet` (the number of sources) is given."""
        tick = tick_seconds(intervals)
        phase = phase_seconds(name, tick, spread)
        slot = tick_slot_seconds(tick, spread, fleet)
        if slot > 0:  # the phase's slot, then the next instant of the grid: still within one spread of now
            phase = math.floor(phase / slot) * slot
            origin = math.ceil((now + phase) / slot) * slot
        else:
            origin = now + phase
        sched = cls(origin=origin, tick=tick)
        sched.set_intervals(intervals)
        return sched

    @property
    def eps(self) -> float:
        return self.tick * 1e-6

    def tick_time(self, k: int) -> float:
        return self.origin + k * self.tick

    def set_intervals(self, intervals: Mapping[str, int]) -> bool:
        """Apply the current active intervals; returns True when anything changed.

        A new metric is due at the next tick. A metric whose interval changed is next due one new
        interval after it last ran. When the tick changes, the grid is re-based at the last tick
        taken and every due time is moved onto the new grid.
        """
        new = {name: int(i) for name, i in intervals.items() if i > 0}
        if new == self.intervals:
            return False
        new_tick = tick_seconds(new)
        if new_tick != self.tick:
            base = self.tick_time(self.k) if self.k >= 0 else self.origin
            self.origin, self.tick, self.k = base, new_tick, (0 if self.k >= 0 else -1)
        for name in list(self.next_due):
            if name not in new:
                del self.next_due[name]
        for name, interval in new.items():
            old = self.intervals.get(name)
            if name not in self.next_due:
                self.next_due[name] = -math.inf  # due at the next tick taken
            elif old != interval and name in self.last_due:
                self.next_due[name] = self._on_grid(self.last_due[name] + interval)
            else:
                self.next_due[name] = self._on_grid(self.next_due[name])
        self.intervals = new
        return True

    def _on_grid(self, t: float) -> float:
        """The first tick time at or after t."""
        if t == -math.inf:
            return t
        return self.tick_time(max(0, math.ceil((t - self.origin) / self.tick - 1e-9)))

    def next_tick(self, now: float) -> tuple[int, float]:
        """The index and time of the next tick to take: never an earlier or the same tick again,
        and never one already in the past by more than a tick (missed ticks are skipped)."""
        k = max(self.k + 1, math.ceil((now - self.origin) / self.tick - 1e-9))
        return k, self.tick_time(k)

    def take(self, k: int) -> list[str]:
        """Mark tick k as taken and return the metrics due at it, sorted by name."""
        t = self.tick_time(k)
        self.k = k
        due = []
        reach = t + self.eps  # (once: this runs for every metric of every tick)
        next_due, intervals = self.next_due, self.intervals
        for name, when in next_due.items():
            if when <= reach:
                due.append(name)
                interval = intervals[name]
                if when == -math.inf:
                    nxt = t + interval
                else:
                    nxt = when + (math.floor((reach - when) / interval) + 1) * interval
                next_due[name] = nxt
                self.last_due[name] = t
        return sorted(due)
