"""The batch's ONE statement per connection (reaper.db.combined), on a real PostgreSQL 15.

- Ticks with different sets of due metrics send the same statement text (one prepared statement, one row
  in pg_stat_statements), and a member that is not due does not run on the server; the flags that say
  which are due cost no type introspection on a new connection.
- A source's metrics at different intervals: every tick of a real source sends that one text.
- A member that goes bad later (its table dropped) fails the statement once: the due metrics' rows still
  come back (each alone), and the next tick's statement leaves the bad member out.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from test_collect_pg import wait_for
from test_regression_guard import _calls

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg

ONE = "select 1 as one"
TWO = "select 2 as two"
# fails when it runs (not when it is planned): a division by a count the planner cannot know
BOOM = "select 1 / (select count(*) from pg_class where relname = 'no such table')::int as boom"


def _batch_statements(pg15: Any, dbname: str) -> list[tuple[str, int]]:
    out = pg15.psql("select calls, md5(query) from pg_stat_statements s join pg_database d on d.oid = s.dbid "
                    f"where d.datname = '{dbname}' and s.query ilike 'select pg_is_in_recovery()%'")
    return [(digest, int(calls)) for calls, digest in (line.split("|") for line in out.splitlines() if line)]


async def test_different_due_sets_send_one_statement_and_a_member_not_due_does_not_run(pg15, fresh_db,
                                                                                      monkeypatch) -> None:
    import asyncpg

    introspected: list[Any] = []  # the flags' type needs no read of the server's catalog (asyncpg's introspection)
    real = asyncpg.Connection._introspect_types

    async def spy(self: Any, typeoids: Any, *args: Any) -> Any:
        introspected.append(typeoids)
        return await real(self, typeoids, *args)

    monkeypatch.setattr(asyncpg.Connection, "_introspect_types", spy)
    universe = {"one": ONE, "two": TWO, "boom": BOOM}
    async with db.open_loop():
        conn = await db.open_source_connection(pg15.dsn(dbname=fresh_db), statement_timeout_seconds=10)
        try:
            seen = []
            for due in (["one"], ["two"], ["one", "two"], [], ["two"]):
                outcome = await conn.run_tick(db.TickRequest(batch={n: universe[n] for n in due}, universe=universe))
                assert not outcome.errors and not outcome.isolated, outcome  # boom never ran
                assert outcome.statements == 1
                seen.append(sorted(outcome.rows))
                assert {n: r for n, r in outcome.rows.items()} == {n: [{n: {"one": 1, "two": 2}[n]}] for n in due}
        finally:
            await conn.close()
    assert seen == [["one"], ["two"], ["one", "two"], [], ["two"]]
    assert introspected == []
    statements = _batch_statements(pg15, fresh_db)
    assert len(statements) == 1 and statements[0][1] == 5, statements


async def test_a_member_gone_bad_fails_once_and_the_next_statement_leaves_it_out(pg15, fresh_db) -> None:
    pg15.psql("create table gone (x int); insert into gone values (7)", dbname=fresh_db)
    universe = {"one": ONE, "gone": "select x from gone"}
    async with db.open_loop():
        conn = await db.open_source_connection(pg15.dsn(dbname=fresh_db), statement_timeout_seconds=10)
        try:
            first = await conn.run_tick(db.TickRequest(batch={"one": ONE, "gone": universe["gone"]}, universe=universe))
            assert first.rows == {"one": [{"one": 1}], "gone": [{"x": 7}]} and not first.isolated
            pg15.psql("drop table gone", dbname=fresh_db)
            # "gone" is not due, but its plan is: the statement fails, the due metric runs alone
            second = await conn.run_tick(db.TickRequest(batch={"one": ONE}, universe={"one": ONE}))
            assert second.rows == {"one": [{"one": 1}]} and second.isolated and not second.errors
            third = await conn.run_tick(db.TickRequest(batch={"one": ONE}, universe={"one": ONE}))
            assert third.rows == {"one": [{"one": 1}]} and not third.isolated and third.statements == 1
        finally:
            await conn.close()


async def test_a_column_added_to_a_table_read_with_star_shows_once_the_metrics_are_described_again(
        pg15, fresh_db) -> None:
    """The batch takes each metric's columns by name, as described when first seen: a column added to a table a
    metric reads with `*` never showed until the connection was made again (a dropped one fails the statement
    and is described at once). A connection now describes its metrics anew every REDESCRIBE_SECONDS."""
    pg15.psql("create table grows (a int); insert into grows values (1)", dbname=fresh_db)
    universe = {"one": ONE, "star": "select * from grows"}
    async with db.open_loop():
        conn = await db.open_source_connection(pg15.dsn(dbname=fresh_db), statement_timeout_seconds=10)
        try:
            first = await conn.run_tick(db.TickRequest(batch=universe, universe=universe))
            assert first.rows == {"one": [{"one": 1}], "star": [{"a": 1}]}
            pg15.psql("alter table grows add column b int default 2", dbname=fresh_db)
            second = await conn.run_tick(db.TickRequest(batch=universe, universe=universe))
            assert second.rows["star"] in ([{"a": 1}], [{"a": 1, "b": 2}]) and not second.errors  # nothing shifted
            assert conn.described_until - time.monotonic() <= db.REDESCRIBE_SECONDS
            conn.described_until = 0.0  # REDESCRIBE_SECONDS have passed
            third = await conn.run_tick(db.TickRequest(batch=universe, universe=universe))
            assert third.rows == {"one": [{"one": 1}], "star": [{"a": 1, "b": 2}]}
            assert not third.errors and not third.isolated and third.statements == 1
        finally:
            await conn.close()


async def test_a_source_with_metrics_at_two_intervals_sends_one_batch_statement(pg15, fresh_db) -> None:
    shipped = Catalog.for_config()
    fast = MetricDef(name="fast_one", description="every tick", sql={14: ONE}, gauges=("*",))
    slow = MetricDef(name="slow_two", description="every third tick", sql={14: TWO}, gauges=("*",))
    catalog = Catalog(metrics={**shipped.metrics, "fast_one": fast, "slow_two": slow}, presets=shipped.presets)
    src = SourceConfig(name="two_intervals", dsn=pg15.dsn(dbname=fresh_db), metrics={"fast_one": 1, "slow_two": 3})
    got: list[Measurement] = []
    source = SourceReaper(src, catalog, got.append)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(source.run)
        await wait_for(lambda: sum(m.metric == "slow_two" for m in got) >= 2
                       and sum(m.metric == "fast_one" for m in got) >= 5, limit=30)
        n.cancel_scope.cancel()
    statements = _batch_statements(pg15, fresh_db)
    assert len(statements) == 1, statements  # ticks with and without slow_two: the same text
    assert _calls(pg15, fresh_db, "select pg_is_in_recovery()%") == statements[0][1] >= 5
