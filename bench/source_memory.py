"""What each extra source holds (issue 14: 55 KB per source): tracemalloc snapshots of an in-process fleet.

Starts a throwaway PostgreSQL 15, runs N sources (the `basic` preset re-timed to --interval seconds, as
in fleet1000 but faster) in one trio run with reaper's asyncio loop, takes a snapshot after they have
ticked a few times, starts N more, snapshots again, and prints the allocation sites that grew, in
bytes per extra source (grouped by line, then by file), plus the trio tasks per source.

    python bench/source_memory.py [--sources 100] [--interval 5] [--settle 20] [--frames 8]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from pathlib import Path

import trio
import trio.lowlevel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from pgserver import PgServer  # noqa: E402

from reaper import db  # noqa: E402
from reaper.catalog.metrics import Catalog  # noqa: E402
from reaper.config.schema import SourceConfig  # noqa: E402
from reaper.daemon.source import FleetControls, SourceReaper  # noqa: E402


def count_tasks() -> int:
    todo, n = [trio.lowlevel.current_root_task()], 0
    while todo:
        task = todo.pop()
        n += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return n


def snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])


def short(filename: str) -> str:
    for mark in ("site-packages/", "python3.11/", "/reaper/", "/bench/"):
        if mark in filename:
            return filename.split(mark, 1)[1]
    return filename


async def main(dsn: str, n: int, interval: float, settle: float, top: int, preset: str = "basic",
               frames: int = 1) -> None:
    catalog = Catalog.for_config()
    metrics = dict.fromkeys(catalog.presets[preset].metrics, int(interval))
    controls = FleetControls()
    rows = [0]

    def emit(m: object) -> None:
        rows[0] += 1

    def make(i: int) -> SourceReaper:
        src = SourceConfig(name=f"s{i:04d}", dsn=dsn, preset=preset, metrics=metrics)
        return SourceReaper(src, catalog, emit, controls=controls)

    async with db.open_loop(), trio.open_nursery() as nursery:
        first = [make(i) for i in range(n)]
        for r in first:
            await nursery.start(r.run)
        await trio.sleep(settle)
        tasks1, snap1 = count_tasks(), snapshot()
        second = [make(n + i) for i in range(n)]
        for r in second:
            await nursery.start(r.run)
        await trio.sleep(settle)
        tasks2, snap2 = count_tasks(), snapshot()
        ticks = sum(r.state.ticks for r in first + second)
        nursery.cancel_scope.cancel()
    growth = sum(s.size_diff for s in snap2.compare_to(snap1, "filename"))
    print(f"{n} -> {2 * n} sources: {growth / n / 1024:.1f} KiB traced per extra source; "
          f"{(tasks2 - tasks1) / n:.2f} trio tasks per extra source ({tasks2} in all); {ticks} ticks, "
          f"{rows[0]} measurements")
    for key in ("lineno", "filename"):
        print(f"\ntop {top} by {key} (bytes per extra source, allocations per extra source):")
        for stat in snap2.compare_to(snap1, key)[:top]:
            frame = stat.traceback[0]
            where = f"{frame.filename}:{frame.lineno}" if key == "lineno" else frame.filename
            print(f"{stat.size_diff / n:10.0f} B {stat.count_diff / n:7.1f}  {where}")
    if frames > 1:
        print(f"\ntop {top} by traceback (innermost frame first):")
        for stat in snap2.compare_to(snap1, "traceback")[:top]:
            print(f"{stat.size_diff / n:10.0f} B {stat.count_diff / n:7.1f}")
            for frame in reversed(stat.traceback):
                print(f"{'':22}{short(frame.filename)}:{frame.lineno}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=100)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--preset", default="basic", help="the preset each source runs (re-timed to --interval)")
    parser.add_argument("--frames", type=int, default=1,
                        help="frames kept per allocation; above 1 also prints the top sites with their callers")
    args = parser.parse_args()
    server = PgServer.create(major=15, settings={"max_connections": str(2 * args.sources + 20)})
    try:
        tracemalloc.start(args.frames)
        trio.run(main, server.dsn(), args.sources, args.interval, args.settle, args.top, args.preset,
                 args.frames)
    finally:
        server.cleanup()
