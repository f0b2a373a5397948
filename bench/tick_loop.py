"""The tick's own Python, in a loop: a lab for A/B comparisons of the hot path (issue 14), not a benchmark.

One real SourceReaper on the bench's PostgreSQL 15 runs its ticks back to back, each with the metrics its
own schedule makes due (the preset's intervals, the clock moved on by one tick each time, so a loop of N
ticks sees the same mix of due sets a source sees in N real ticks), and every measurement it emits is
encoded as the jsonfile sink does. Prints the CPU (process time) per tick of the steady loop, best of
`--rounds`. Hot caches and no sleeping between ticks: it compares two builds of the code, it does not
say what a daemon costs (bench/profile_tick.py, `just bench`).

    python bench/tick_loop.py --preset exhaustive --ticks 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))

import lab  # noqa: E402
import trio  # noqa: E402

from reaper import db  # noqa: E402
from reaper.catalog.metrics import Catalog  # noqa: E402
from reaper.config.schema import SourceConfig  # noqa: E402
from reaper.daemon.source import SourceReaper  # noqa: E402
from reaper.measurement import Measurement  # noqa: E402
from reaper.schedule import Schedule  # noqa: E402
from reaper.sinks.jsonfile import encode_measurement  # noqa: E402


async def loop(dsn: str, preset: str, ticks: int, rounds: int, profile: str | None) -> list[float]:
    catalog = Catalog.for_config()
    source = SourceReaper(SourceConfig(name="lab", dsn=dsn, preset=preset), catalog, lambda m: sink(m))
    encoded = [0]

    def sink(m: Measurement) -> None:
        encoded[0] += len(encode_measurement(m))

    intervals = source.active_intervals()
    sched = Schedule.starting(0.0, "lab", intervals)
    results = []
    async with db.open_loop():
        k = 0
        for _ in range(20):  # connect, describe every member, warm the caches
            k += 1
            await source.tick(sched.take(k))
        for _ in range(rounds):
            prof = None
            if profile:
                import cProfile

                prof = cProfile.Profile(time.process_time)
                prof.enable()
            t0 = time.process_time()
            for _ in range(ticks):
                k += 1
                await source.tick(sched.take(k))
            results.append((time.process_time() - t0) / ticks)
            if prof is not None:
                prof.disable()
                prof.dump_stats(profile)
        if source.conn is not None:
            await source.conn.close()
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="exhaustive")
    p.add_argument("--ticks", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", help="cProfile the last round into this file")
    args = p.parse_args()
    server = lab.start_server(max_connections=20)
    try:
        dbs = lab.database_names(1)
        lab.prepare(server, dbs)
        dsn = server.dsn(user=lab.REAPER_ROLE, dbname=dbs[0])
        results = trio.run(loop, dsn, args.preset, args.ticks, args.rounds, args.profile)
    finally:
        server.stop()
    print(f"{args.preset}: {min(results) * 1e6:.0f} us CPU per tick (best of {len(results)}; all: "
          + ", ".join(f"{r * 1e6:.0f}" for r in results) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
