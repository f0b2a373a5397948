"""The fleet-wide tick-lateness histogram (reaper.daemon.sourcestate.LatenessHistogram): what a tick on
a bucket's bound counts as, the quantiles' upper bounds, the window between two snapshots, and its round
trip through the status file (`reaper status`, the bench's steady-window p99)."""

from __future__ import annotations

import math
from pathlib import Path

from reaper.daemon.sourcestate import LatenessHistogram
from reaper.daemon.status import (
    LATENESS_BOUNDS,
    DaemonStatus,
    LatenessBuckets,
    read_status_file,
    write_status_file,
)


def histogram(*values: float) -> LatenessHistogram:
    h = LatenessHistogram()
    for v in values:
        h.observe(v)
    return h


def test_a_tick_on_a_bound_counts_in_that_bucket_and_the_counts_are_cumulative() -> None:
    snap = histogram(0.0, 0.001, 0.0011, 0.05, 10.0, 11.0).snapshot()
    counts = dict(zip(snap.le, snap.counts, strict=False))
    assert counts[0.001] == 2 and counts[0.0025] == 3 and counts[0.05] == 4 and counts[10.0] == 5
    assert snap.total == 6 and len(snap.counts) == len(LATENESS_BOUNDS) + 1
    assert list(snap.counts) == sorted(snap.counts)
    assert math.isclose(snap.sum, 21.0521)


def test_quantiles_are_the_bounds_of_their_buckets() -> None:
    assert LatenessBuckets(le=LATENESS_BOUNDS, counts=(0,) * (len(LATENESS_BOUNDS) + 1), sum=0.0).quantile(0.99) is None
    snap = histogram(*([0.0005] * 98 + [0.03, 0.2])).snapshot()  # 100 ticks: the 99th is 30 ms late
    assert snap.quantile(0.5) == 0.001
    assert snap.quantile(0.98) == 0.001
    assert snap.quantile(0.99) == 0.05
    assert snap.quantile(1.0) == 0.25
    assert histogram(20.0).snapshot().quantile(0.5) == math.inf


def test_since_keeps_only_the_ticks_of_the_window() -> None:
    h = histogram(*([2.0] * 50))  # a stormy start-up
    start = h.snapshot()
    for _ in range(200):
        h.observe(0.002)
    window = h.snapshot().since(start)
    assert window.total == 200 and window.quantile(0.99) == 0.0025
    assert math.isclose(window.sum, 0.4)
    assert h.snapshot().since(None) == h.snapshot()
    assert h.snapshot().quantile(0.99) == 2.5  # the whole run's p99 still shows the start-up


def test_the_status_file_carries_it(tmp_path: Path) -> None:
    snap = histogram(0.001, 0.3).snapshot()
    status = DaemonStatus(pid=1, version="0", started_wall=1.0, updated_wall=2.0, config_path="c.toml", reloads=0,
                          reload_failures=0, tasks=1, sources=(), sinks=(), tick_lateness=snap)
    write_status_file(tmp_path / "status.json", status)
    assert read_status_file(tmp_path / "status.json").tick_lateness == snap
