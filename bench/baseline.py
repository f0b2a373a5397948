"""The bench's yardsticks, measured in the same run as reaper: a bare asyncpg `select 1` round-trip loop,
on plain asyncio and through trio-asyncio (one `aio_as_trio` crossing per round trip, as reaper's ticks).

    python bench/baseline.py DSN [--count N]   -> one JSON line: CPU µs per round trip for each

Each loop runs in its own process (so neither warms the other) and reports the process CPU
(utime+stime) per round trip after a warm-up, the way reaper's figures are taken. Dividing reaper's CPU
per source tick by these gives a ratio that a loaded machine does not move much.

Two more yardsticks are paced like a fleet (`paced_trio_asyncio_us`, `paced_asyncio_us`):
PACED_CONNECTIONS connections (through trio-asyncio, and on plain asyncio), each sending one `select 1`
every PACED_PERIOD seconds at its own phase, so every round trip finds its server backend asleep and its
event loop woken from epoll, as a source's tick does; the tight loops above never pay those wake-ups.
They are reported beside the others, never instead of them.
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
PACED_CONNECTIONS = 20
PACED_PERIOD = 1.0
PACED_SECONDS = 20.0


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


def paced_asyncio(dsn: str, connections: int = PACED_CONNECTIONS, period: float = PACED_PERIOD,
                  seconds: float = PACED_SECONDS) -> float:
    import asyncpg

    async def main() -> float:
        conns = [await asyncpg.connect(dsn) for _ in range(connections)]
        trips = 0

        async def pace(conn: Any, phase: float, until: float) -> None:
            nonlocal trips
            await asyncio.sleep(phase)
            while time.monotonic() < until:
                await conn.fetchval("select 1")
                trips += 1
                await asyncio.sleep(period)

        try:
            await asyncio.gather(*[pace(c, period * i / connections, time.monotonic() + period)
                                   for i, c in enumerate(conns)])
            trips = 0
            c0 = time.process_time()
            until = time.monotonic() + seconds
            await asyncio.gather(*[pace(c, period * i / connections, until) for i, c in enumerate(conns)])
            return (time.process_time() - c0) / max(1, trips)
        finally:
            for conn in conns:
                await conn.close()

    return asyncio.run(main())


def paced_trio_asyncio(dsn: str, connections: int = PACED_CONNECTIONS, period: float = PACED_PERIOD,
                       seconds: float = PACED_SECONDS) -> float:
    import asyncpg
    import trio
    import trio_asyncio
    from trio_asyncio import aio_as_trio

    async def main() -> float:
        async with trio_asyncio.open_loop():
            conns = [await aio_as_trio(asyncpg.connect)(dsn) for _ in range(connections)]
            trips = 0

            async def pace(conn: Any, phase: float, until: float) -> None:
                nonlocal trips
                await trio.sleep(phase)
                while trio.current_time() < until:
                    await aio_as_trio(conn.fetchval)("select 1")
                    trips += 1
                    await trio.sleep(period)

            try:
                async with trio.open_nursery() as nursery:  # warm-up: one round of every connection
                    for i, conn in enumerate(conns):
                        nursery.start_soon(pace, conn, period * i / connections, trio.current_time() + period)
                trips = 0
                c0 = time.process_time()
                async with trio.open_nursery() as nursery:
                    until = trio.current_time() + seconds
                    for i, conn in enumerate(conns):
                        nursery.start_soon(pace, conn, period * i / connections, until)
                return (time.process_time() - c0) / max(1, trips)
            finally:
                for conn in conns:
                    await aio_as_trio(conn.close)()

    return trio.run(main)


def measure(dsn: str, count: int = 3000) -> dict[str, Any]:
    """Both loops, each in a fresh interpreter: {"asyncio_us": ..., "trio_asyncio_us": ..., "count": N}."""
    out: dict[str, Any] = {"count": count}
    for key, how in (("asyncio_us", "asyncio"), ("trio_asyncio_us", "trio"), ("paced_trio_asyncio_us", "paced"),
                     ("paced_asyncio_us", "paced-asyncio")):
        proc = subprocess.run([sys.executable, __file__, dsn, "--count", str(count), "--only", how],
                              capture_output=True, text=True, timeout=300)
        if how.startswith("paced"):
            out["paced"] = {"connections": PACED_CONNECTIONS, "period_s": PACED_PERIOD, "seconds": PACED_SECONDS}
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
    ap.add_argument("--only", choices=["asyncio", "trio", "paced", "paced-asyncio"])
    args = ap.parse_args()
    if args.only == "asyncio":
        print(json.dumps({"seconds": plain_asyncio(args.dsn, args.count)}))
    elif args.only == "trio":
        print(json.dumps({"seconds": through_trio_asyncio(args.dsn, args.count)}))
    elif args.only == "paced":
        print(json.dumps({"seconds": paced_trio_asyncio(args.dsn)}))
    elif args.only == "paced-asyncio":
        print(json.dumps({"seconds": paced_asyncio(args.dsn)}))
    else:
        print(json.dumps(measure(args.dsn, args.count)))


if __name__ == "__main__":
    main()
