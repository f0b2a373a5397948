"""Top-N against a real PostgreSQL 15 (issue 16's acceptance): 2000 distinct statements in
pg_stat_statements, a stat_statements metric with top_n.n = 20, ten ticks while the workload changes
which statements lead. Every measurement has at most 21 rows; for every counter column the sum over
its rows equals the sum over pg_stat_statements for the database read in the same statement; the
`other` row's counters never decrease.

"The same statement": the metric below reads pg_stat_statements ONCE (a materialized CTE) and returns
both the per-queryid rows and, in a text column of every row, the totals over that same read. (Two
scans of pg_stat_statements in one statement can differ: it is shared memory, not an MVCC snapshot.)
"""

from __future__ import annotations

import decimal
import itertools
import json
import time
from collections.abc import Mapping
from typing import Any

import pytest
import trio
from pgserver import ServerHandle
from test_collect_pg import wait_for

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, NameList, SourceConfig
from reaper.config.topn import TopN
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg

COLUMNS = 45  # pairs of columns of one table: 45 * 45 = 2025 distinct query ids
INTEGERS = ["calls", "rows", "shared_blks_hit", "shared_blks_read", "shared_blks_written", "shared_blks_dirtied",
            "temp_blks_read", "temp_blks_written", "wal_fpi", "wal_bytes"]
TIMES = {"total_time": "total_exec_time", "blk_read_time": "blk_read_time", "blk_write_time": "blk_write_time",
         "temp_blk_read_time": "temp_blk_read_time", "temp_blk_write_time": "temp_blk_write_time",
         "total_plan_time": "total_plan_time", "jit_generation_time": "jit_generation_time"}
COUNTERS = INTEGERS + list(TIMES)


def checked_sql() -> str:
    per_query = [f"sum({c})::int8 as {c}" for c in INTEGERS] + [f"sum({src}::numeric) as {c}"
                                                                 for c, src in TIMES.items()]
    totals = (["'query_ids', count(distinct coalesce(queryid, 0))"] + [f"'{c}', sum({c})" for c in INTEGERS]
              + [f"'{c}', sum({src}::numeric)" for c, src in TIMES.items()])
    return f"""
with raw as materialized (
  select s.* from pg_stat_statements s
  where s.dbid = (select oid from pg_database where datname = current_database())
),
totals as (select json_build_object({', '.join(totals)})::text as check_sums from raw)
select
  (extract(epoch from now()) * 1e9)::int8 as epoch_ns,
  r.queryid::text as tag_queryid,
  {', '.join(per_query)},
  (select check_sums from totals) as check_sums
from raw r
group by r.queryid
"""


ROUNDS = 7


def statements(pairs: list[tuple[int, int]], times: int = 1) -> str:
    return "".join(f"select c{i}, c{j} from wide where false;\n" for i, j in pairs for _ in range(times))


@pytest.mark.timeout(180)
async def test_top_20_of_2000_statements_keep_exact_sums_and_a_monotonic_other(pg15: ServerHandle,
                                                                             fresh_db: str) -> None:
    pg15.psql("create extension if not exists pg_stat_statements; create table wide ("
              + ", ".join(f"c{i} int" for i in range(COLUMNS)) + ")", dbname=fresh_db)
    max_entries = int(pg15.psql("show pg_stat_statements.max"))
    pg15.psql("select pg_stat_statements_reset()")  # room for our 2000 entries: none may be evicted
    pairs = [(i, j) for i in range(COLUMNS) for j in range(COLUMNS)][:2000]
    pg15.psql(statements(pairs), dbname=fresh_db)
    dealloc_before = pg15.psql("select dealloc from pg_stat_statements_info")
    entries = int(pg15.psql("select count(*) from pg_stat_statements s join pg_database d on d.oid = s.dbid "
                            f"where d.datname = '{fresh_db}'"))
    assert entries >= 2000 and entries < max_entries

    metric = MetricDef(name="stat_statements", sql={15: checked_sql()},
                       requires_extension=NameList(("pg_stat_statements",)),
                       top_n=TopN(by="total_time", key=("tag_queryid",)))
    shipped = Catalog.for_config()
    catalog = Catalog(metrics={**shipped.metrics, "stat_statements": metric}, presets=shipped.presets)
    src = SourceConfig(name="topn", dsn=pg15.dsn(dbname=fresh_db), metrics={"stat_statements": 1},
                       top_n={"stat_statements": TopN(n=20)})
    got: list[Measurement] = []
    reaper = SourceReaper(src, catalog, got.append)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        await wait_for(lambda: len(got) >= 1, limit=30)
        # each round, 20 other statements run twice as often as last round's leaders (40 * (r + 1) times, as
        # before, made the later rounds' leaders a matter of microseconds of noise in total_time: 11 vs 10 calls)
        for r in range(ROUNDS):
            hot = pairs[100 + 20 * r: 120 + 20 * r]
            await trio.to_thread.run_sync(pg15.psql, statements(hot, times=40 * 2 ** r), fresh_db)
            # min_stay_intervals (3) measurements taken after the whole round ran: last round's members may leave
            done = time.time_ns()
            await wait_for(lambda done=done: sum(m.metric == "stat_statements" and m.epoch_ns > done
                                                 for m in got) >= 3, limit=30)
        n.cancel_scope.cancel()
    assert pg15.psql("select dealloc from pg_stat_statements_info") == dealloc_before  # nothing was evicted

    measurements = [m for m in got if m.metric == "stat_statements"]
    assert len(measurements) >= ROUNDS + 1
    last_other: Mapping[str, Any] = {}
    leaders: list[frozenset[str]] = []
    for m in measurements:
        assert len(m.rows) <= 21
        others = [row for row in m.rows if row["tag_queryid"] == "other"]
        assert len(others) == 1
        other = others[0]
        sums = json.loads(next(row["check_sums"] for row in m.rows if "check_sums" in row),
                          parse_float=decimal.Decimal, parse_int=int)
        assert len(m.rows) - 1 == 20 and other["rows_folded"] == sums["query_ids"] - 20
        for column in COUNTERS:
            values = [row[column] for row in m.rows if row.get(column) is not None]
            total = sums[column]
            assert sum(values, decimal.Decimal(0)) == (decimal.Decimal(0) if total is None else total), column
            assert other[column] >= last_other.get(column, 0), column
        last_other = other
        leaders.append(frozenset(row["tag_queryid"] for row in m.rows if row["tag_queryid"] != "other"))
    changes = sum(a != b for a, b in itertools.pairwise(leaders))
    assert changes >= ROUNDS - 1, changes  # the workload really changed which statements lead
