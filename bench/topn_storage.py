"""Storage rows per hour saved by the top_n presets (issue 16 item 3).

Starts a throwaway PostgreSQL 15 (tests/pgserver.py), creates a database with TABLES tables (each with
a primary key and one more index, a few rows, some scanned), FUNCTIONS plpgsql functions called once,
and STATEMENTS distinct statements in pg_stat_statements; then runs reaper's real collection
(SourceReaper, in process) for each preset with every metric due at once, two ticks, and counts the
rows each metric delivered. Rows per hour = sum over the preset's metrics of rows per measurement x
3600 / interval (the preset's own intervals). The special metrics that read no server state worth
counting here (psutil_*, server log) deliver what they deliver on this host.

    .venv/bin/python bench/topn_storage.py [--tables 2000 --statements 3000 --functions 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/pgserver.py

from pgserver import PgServer

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

PAIRS = (("exhaustive", "exhaustive_topn"), ("full", "full_topn"))


def populate(server: PgServer, dbname: str, tables: int, functions: int, statements: int) -> None:
    server.psql(f"create database {dbname}")
    server.psql("create extension if not exists pg_stat_statements", dbname=dbname)
    ddl = "".join(f"create table t{i} (id int primary key, v int, w text); create index on t{i} (v);\n"
                  f"insert into t{i} select g, g, 'x' from generate_series(1, {1 + i % 50}) g;\n"
                  for i in range(tables))
    server.psql(ddl, dbname=dbname)
    server.psql("".join(f"create function f{i}(int) returns int language plpgsql as "
                        f"$$begin return $1 + {i}; end$$; select f{i}(1);\n" for i in range(functions)), dbname=dbname)
    work = "".join(f"select count(*) from t{i % tables} where v > {i};\n" if i < tables else
                   f"select id, v from t{i % tables} where id = 1 and v < {i} order by v limit {1 + i % 7};\n"
                   for i in range(statements))
    server.psql(work, dbname=dbname)
    server.psql("analyze", dbname=dbname)


async def rows_per_metric(catalog: Catalog, dsn: str, preset: str) -> dict[str, int]:
    metrics = dict.fromkeys(catalog.presets[preset].metrics, 1)
    src = SourceConfig(name=preset, dsn=dsn, preset=preset, metrics=metrics)
    got: list[Measurement] = []
    reaper = SourceReaper(src, catalog, got.append)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        with trio.fail_after(120):
            while reaper.state.ticks < 3:  # noqa: ASYNC110 (SourceReaper has no per-tick event to wait on)
                await trio.sleep(0.2)
        n.cancel_scope.cancel()
    last: dict[str, int] = {}
    for m in got:  # the last measurement of each metric
        last[m.metric] = len(m.rows)
    return last


def per_hour(catalog: Catalog, preset: str, rows: dict[str, int]) -> dict[str, float]:
    intervals = catalog.presets[preset].metrics
    return {m: rows.get(m, 0) * 3600 / s for m, s in intervals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=2000)
    parser.add_argument("--functions", type=int, default=300)
    parser.add_argument("--statements", type=int, default=3000)
    args = parser.parse_args()
    catalog = Catalog.for_config()
    with PgServer.create(major=15) as server:
        populate(server, "bench", args.tables, args.functions, args.statements)
        dsn = server.dsn(dbname="bench")
        print(f"server: {args.tables} tables (+{2 * args.tables} indexes), {args.functions} functions, "
              f"{args.statements} distinct statements")
        for base, topn in PAIRS:
            hours = {p: per_hour(catalog, p, trio.run(rows_per_metric, catalog, dsn, p)) for p in (base, topn)}
            total = {p: sum(h.values()) for p, h in hours.items()}
            print(f"\n{base}: {total[base]:,.0f} rows/hour   {topn}: {total[topn]:,.0f} rows/hour   "
                  f"saved {total[base] - total[topn]:,.0f} ({100 * (1 - total[topn] / total[base]):.0f} %)")
            names = sorted(set(hours[base]) | set(hours[topn]), key=lambda m: -(hours[base].get(m, 0)))
            for m in names:
                a, b = hours[base].get(m, 0), hours[topn].get(m, 0)
                if a != b:
                    print(f"  {m:24} {a:>10,.0f} -> {b:>8,.0f}")


if __name__ == "__main__":
    main()
