"""What one more bare asyncpg connection costs in RSS: the floor under reaper's memory per source (issue 14).

Starts the bench's throwaway PostgreSQL 15, then in a fresh process per event loop (plain asyncio, and
trio through trio-asyncio as reaper runs it) opens one connection, then --connections more, each with
one prepared statement used a few times, and prints (RSS after - RSS before) / connections in KB
(1000 bytes). No reaper code runs: what reaper adds per source is its own figure minus this one.

    python bench/conn_floor.py [--connections 400]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))

import lab  # noqa: E402

CHILD = r"""
import asyncio, gc, sys
import asyncpg

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1.024 for line in f if line.startswith("VmRSS"))

async def measure(dsn, n):
    first = await asyncpg.connect(dsn)
    await first.fetch("select 1")
    gc.collect()
    before = rss_kb()
    more = [await asyncpg.connect(dsn) for _ in range(n)]
    for _ in range(3):
        for conn in more:
            await conn.fetch("select relname, relpages, reltuples::int8 from pg_class limit 20")
    gc.collect()
    print(f"{sys.argv[3]:>12}: {(rss_kb() - before) / n:.1f} KB per extra connection ({n} connections)", flush=True)

dsn, n, loop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if loop == "asyncio":
    asyncio.run(measure(dsn, n))
else:
    import trio, trio_asyncio

    async def main():
        async with trio_asyncio.open_loop():
            await trio_asyncio.aio_as_trio(measure)(dsn, n)

    trio.run(main)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=400)
    args = parser.parse_args()
    server = lab.start_server(max_connections=args.connections + 20)
    try:
        (dbname,) = lab.database_names(1)
        lab.prepare(server, [dbname])
        dsn = server.dsn(user=lab.REAPER_ROLE, dbname=dbname)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        for loop in ("asyncio", "trio-asyncio"):
            subprocess.run([sys.executable, "-c", CHILD, dsn, str(args.connections), loop], env=env, check=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
