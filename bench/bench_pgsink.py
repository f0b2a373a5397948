"""Throughput of the `postgres` sink: rows and measurements per second into a real PostgreSQL 15.

    python bench/bench_pgsink.py [--measurements 10000] [--rows 20] [--sources 100] [--batch 500 ...]

Starts its own throwaway server (tests/pgserver.py, fsync off as for every throwaway server), then for each
shape and batch size (measurements per `write`, as the sink task hands them over):

- python:   the sink's own work alone (grouping, fingerprint, JSON encoding of every row), no database;
- server:   the same rows, already encoded, through the storage connection (binary COPY, one transaction
            per batch): what PostgreSQL (and asyncpg's binary encoding) can take;
- sink:     `PostgresSink.write`, end to end, the way the daemon calls it (the JSON encoding runs while
            COPY streams, so the two overlap on the two cores).

Shapes: `table_stats` (one row per table, 20 tables per source: 32 columns of which 5 are tags, counters
of mixed magnitudes with many zeros, numeric seconds as Decimal, float times), and a mix of 30 metrics of
1-5 rows with 12 values each (many small COPYs per transaction). Prints a Markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import decimal
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/pgserver.py

from pgserver import PgServer

from reaper import db
from reaper.config.schema import PostgresSinkConfig
from reaper.db.storage import FlushRequest, TableRows, open_storage
from reaper.measurement import Measurement
from reaper.sinks.postgres import PostgresSink, encode_batch

COUNTERS = [
    "table_size_b", "total_relation_size_b", "toast_size_b", "seq_scan", "seq_tup_read", "idx_scan",
    "idx_tup_fetch", "n_tup_ins", "n_tup_upd", "n_tup_del", "n_tup_hot_upd", "n_live_tup", "n_dead_tup",
    "vacuum_count", "autovacuum_count", "analyze_count", "autoanalyze_count", "tx_freeze_age",
    "last_seq_scan_s", "is_part_root", "no_autovacuum",
]
SECONDS = ["seconds_since_last_vacuum", "seconds_since_last_analyze"]  # numeric in PG 14+: Decimal
TIMES = ["total_vacuum_time", "total_autovacuum_time", "total_analyze_time", "total_autoanalyze_time"]


def counter(rng: random.Random) -> int:
    """Zero a third of the time, else log-uniform up to 10^11 (counts, sizes, ages)."""
    return 0 if rng.random() < 0.33 else int(10 ** (rng.random() * 11))


def table_stats_row(rng: random.Random, epoch_ns: int, i: int) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch_ns": epoch_ns, "tag_schema": "public", "tag_table_name": f"table_{i}",
                           "tag_table_full_name": f"public.table_{i}", "tag_table_size_cardinality_mb": "10"}
    row.update((c, counter(rng)) for c in COUNTERS)
    row.update((c, decimal.Decimal(rng.randrange(10**11)).scaleb(-6)) for c in SECONDS)
    row.update((c, round(rng.random() * 10**6, 3)) for c in TIMES)
    return row


def table_stats(count: int, rows: int, sources: int) -> Iterator[Measurement]:
    rng = random.Random(1)
    now = time.time_ns()
    for k in range(count):
        epoch = now + (k // sources) * 1_000_000_000
        yield Measurement(source=f"db{k % sources:03d}", metric="table_stats", table="table_stats", epoch_ns=epoch,
                          rows=[table_stats_row(rng, epoch, i) for i in range(rows)], tags={"env": "bench"})


def mixed(count: int, sources: int) -> Iterator[Measurement]:
    rng = random.Random(2)
    now = time.time_ns()
    metrics = [f"bench_metric_{i:02d}" for i in range(30)]
    for k in range(count):
        epoch = now + (k // (sources * len(metrics))) * 1_000_000_000
        data = [{"epoch_ns": epoch, "tag_name": f"x{j}", **{c: counter(rng) for c in COUNTERS[:12]}}
                for j in range(1 + k % 5)]
        metric = metrics[k % len(metrics)]
        yield Measurement(source=f"db{(k // len(metrics)) % sources:03d}", metric=metric, table=metric,
                          epoch_ns=epoch, rows=data)


def batches_of(measurements: Iterator[Measurement], size: int) -> list[list[Measurement]]:
    all_ = list(measurements)
    return [all_[i:i + size] for i in range(0, len(all_), size)]


async def run_case(dsn: str, name: str, batches: list[list[Measurement]], rounds: int) -> dict[str, Any]:
    """Each phase `rounds` times, interleaved; the median rate of each is reported."""
    measurements = sum(len(b) for b in batches)
    rows = sum(len(m.rows) for b in batches for m in b)
    rates: dict[str, list[float]] = {"python": [], "server": [], "sink": []}
    sink = PostgresSink(PostgresSinkConfig(dsn=dsn, batching_delay_seconds=0, maintenance_interval_seconds=0))
    await sink.open()
    conn = await open_storage(dsn, partition_seconds=86400)
    for round_ in range(rounds):
        # python alone: what the sink does with the batch (requests materialised for the server run below)
        gc.collect()
        t0 = time.perf_counter()
        requests = []
        for b in batches:
            request = encode_batch(b)
            assert request is not None
            requests.append(attrs.evolve(request, fingerprint=os.urandom(16), tables=[
                TableRows(t.table, list(t.records), t.times, t.count) for t in request.tables]))
        rates["python"].append(rows / (time.perf_counter() - t0))
        # server: the same rows already encoded, one COPY transaction per batch
        await conn.flush(warm_up(requests[0]))
        t0 = time.perf_counter()
        for request in requests:
            await conn.flush(request)
        rates["server"].append(rows / (time.perf_counter() - t0))
        del requests
        # the sink, end to end (a new epoch_ns per round: a batch seen before would be skipped as committed)
        again = [[attrs.evolve(m, epoch_ns=m.epoch_ns + round_) for m in b] for b in batches]
        gc.collect()
        t0 = time.perf_counter()
        for b in again:
            await sink.write(b)
        rates["sink"].append(rows / (time.perf_counter() - t0))
    await conn.close()
    await sink.aclose()
    return {"case": name, "batch": len(batches[0]), "measurements": measurements, "rows": rows,
            "writes": len(batches), **{k: statistics.median(v) for k, v in rates.items()}}


def warm_up(request: FlushRequest) -> FlushRequest:
    """One row per table, so tables and partitions exist and statements are cached before timing."""
    return attrs.evolve(request, fingerprint=os.urandom(16), tables=[
        TableRows(t.table, list(t.records)[:1], t.times[:1], 1) for t in request.tables])


async def main_async(args: argparse.Namespace, dsn: str) -> list[dict[str, Any]]:
    results = []
    async with db.open_loop():
        for batch in args.batch:
            results.append(await run_case(dsn, f"table_stats, {args.rows} rows", batches_of(
                table_stats(args.measurements, args.rows, args.sources), batch), args.rounds))
            results.append(await run_case(dsn, "30 metrics, 1-5 rows", batches_of(
                mixed(args.measurements * args.rows // 3, args.sources), batch), args.rounds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measurements", type=int, default=5_000, help="table_stats measurements (default 5000)")
    parser.add_argument("--rows", type=int, default=20, help="rows per table_stats measurement (default 20)")
    parser.add_argument("--sources", type=int, default=100, help="distinct sources (default 100)")
    parser.add_argument("--batch", type=int, action="append",
                        help="measurements per write (repeatable; default 500 and 50)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; medians are reported (default 3)")
    args = parser.parse_args()
    args.batch = args.batch or [500, 50]
    load_before = os.getloadavg()[0]
    with PgServer.create(major=15, settings={"shared_buffers": "256MB", "max_wal_size": "4GB"}) as server:
        results = trio.run(main_async, args, server.dsn())
    print(f"\n{os.cpu_count()} CPUs, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after "
          f"(1 min; the benchmark itself keeps 2 busy); medians of {args.rounds} rounds\n")
    print("| shape | measurements/write | rows/round | python only rows/s | server only rows/s | sink rows/s | "
          "sink measurements/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['batch']} | {r['rows']:,} | {r['python']:,.0f} | {r['server']:,.0f} | "
              f"{r['sink']:,.0f} | "
              f"{r['sink'] * r['measurements'] / r['rows']:,.0f} |")


if __name__ == "__main__":
    main()
