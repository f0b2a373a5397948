"""The bench's yardsticks, measured in the same run as reaper: a bare asyncpg `select 1` round-trip loop,
on plain asyncio and through trio-asyncio (one `aio_as_trio` crossing per round trip, as reaper's ticks).

    python bench/baseline.py DSN [--count N]   -> one JSON line: CPU µs per round trip for each

Each loop runs in its own process (so neither warms the other) and reports the process CPU
(utime+stime) per round trip after a warm-up, the way reaper's figures are taken. Dividing reaper's CPU
per source tick by these gives a ratio that a loaded machine does not move much.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

WARMUP = 200


async def _loop(dsn: str, count: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(WARMUP):
            await conn.fetchval("select 1")
        c0 = time.process_time()
        for _ in range(count):
            await conn.fetchval("select 1")
        return (time.process_time() - c0) / count
    finally:
        await conn.close()


def plain_asyncio(dsn: str, count: int) -> float:
    return asyncio.run(_loop(dsn, count))


def through_trio_asyncio(dsn: str, count: int) -> float:
    import asyncpg
    import trio
    import trio_asyncio
    from trio_asyncio import aio_as_trio

    async def main() -> float:
        async with trio_asyncio.open_loop():
            conn = await aio_as_trio(asyncpg.connect)(dsn)
            try:
                for _ in range(WARMUP):
                    await aio_as_trio(conn.fetchval)("select 1")
                c0 = time.process_time()
                for _ in range(count):
                    await aio_as_trio(conn.fetchval)("select 1")
                return (time.process_time() - c0) / count
            finally:
                await aio_as_trio(conn.close)()

    return trio.run(main)


def measure(dsn: str, count: int = 3000) -> dict[str, Any]:
    """Both loops, each in a fresh interpreter: {"asyncio_us": ..., "trio_asyncio_us": ..., "count": N}."""
    out: dict[str, Any] = {"count": count}
    for key, how in (("asyncio_us", "asyncio"), ("trio_asyncio_us", "trio")):
        proc = subprocess.run([sys.executable, __file__, dsn, "--count", str(count), "--only", how],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            out[key] = None
            out.setdefault("errors", []).append(proc.stderr.strip()[-500:])
            continue
        out[key] = json.loads(proc.stdout)["seconds"] * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dsn")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--only", choices=["asyncio", "trio"])
    args = ap.parse_args()
    if args.only == "asyncio":
        print(json.dumps({"seconds": plain_asyncio(args.dsn, args.count)}))
    elif args.only == "trio":
        print(json.dumps({"seconds": through_trio_asyncio(args.dsn, args.count)}))
    else:
        print(json.dumps(measure(args.dsn, args.count)))


if __name__ == "__main__":
    main()
