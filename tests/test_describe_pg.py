"""A connection's cold round trips (real PostgreSQL 15). Its new metrics are described together: one prepared
statement (parsed, never run) gives every new metric's columns, instead of one round trip per metric on a
connection's first tick; a metric that does not parse still fails alone, with its own error, and the others
are delivered. The server's facts and its system identifier are read at connect in one statement, in two
when the role may not read pg_control_system()."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from reaper import db
from reaper.db.describe import DESCRIBE_MARK

pytestmark = pytest.mark.pg


class CountingPrepares:
    """asyncpg's connection as it is, but noting each text it is asked to prepare or to fetch a row of."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.texts: list[str] = []
        self.fetched: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def prepare(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self.texts.append(query)
        return await self.real.prepare(query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self.fetched.append(query)
        return await self.real.fetchrow(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self.fetched.append(query)
        return await self.real.fetchval(query, *args, **kwargs)


def count_prepares(conn: db.SourceConnection) -> list[str]:
    """The texts the connection prepares from now on."""
    counting = CountingPrepares(conn._conn)
    conn._conn = counting
    return counting.texts


async def tick(dsn: str, batches: list[dict[str, str]]) -> tuple[list[db.TickOutcome], list[str]]:
    async with db.open_loop():
        with trio.fail_after(10):
            conn = await db.open_source_connection(dsn, statement_timeout_seconds=10)
        try:
            prepares = count_prepares(conn)
            outcomes = [await conn.run_tick(db.TickRequest(batch=batch)) for batch in batches]
        finally:
            await conn.close()
    return outcomes, prepares


async def test_new_metrics_are_described_in_one_prepare(pg15, fresh_db) -> None:
    batch = {"a": "select 1 as one, 'x'::text as label", "b": "select 2.0::float8 as f, 3 as n",
             "c": "select datname from pg_database where datname = current_database()"}
    later = {**batch, "d": "select 4 as four"}
    (first, second, third), prepares = await tick(pg15.dsn(dbname=fresh_db), [batch, batch, later])
    assert not first.errors and not first.isolated and first.statements == 1
    assert first.rows == {"a": [{"one": 1, "label": "x"}], "b": [{"f": 2, "n": 3}], "c": [{"datname": fresh_db}]}
    assert "b" in first.go_ready  # the float column's shape was learnt from the shared description
    assert second.rows == first.rows
    assert third.rows == {**first.rows, "d": [{"four": 4}]}
    describes = [p for p in prepares if DESCRIBE_MARK in p]
    assert len(describes) == 1  # the first tick's three metrics; the later single new one alone
    assert len(prepares) == 2


async def test_a_metric_that_does_not_parse_fails_alone(pg15, fresh_db) -> None:
    batch = {"good": "select 1 as one", "bad": "select no_such_column from pg_database", "also": "select 2 as two"}
    (outcome,), prepares = await tick(pg15.dsn(dbname=fresh_db), [batch])
    assert set(outcome.errors) == {"bad"} and "no_such_column" in outcome.errors["bad"]
    assert outcome.rows == {"good": [{"one": 1}], "also": [{"two": 2}]}
    assert len(prepares) == 1 + 3  # the shared description failed: each alone


async def test_a_column_named_like_the_marker_is_described_alone(pg15, fresh_db) -> None:
    batch = {"odd": f"select 5 as {DESCRIBE_MARK}1, 6 as six", "plain": "select 7 as seven"}
    (outcome,), prepares = await tick(pg15.dsn(dbname=fresh_db), [batch])
    assert not outcome.errors
    assert outcome.rows == {"odd": [{f"{DESCRIBE_MARK}1": 5, "six": 6}], "plain": [{"seven": 7}]}
    assert len(prepares) == 1 + 2


async def connect_counting(dsn: str, monkeypatch: pytest.MonkeyPatch) -> tuple[db.ServerInfo, list[str]]:
    """Connect with asyncpg's connection wrapped; the server facts and the statements sent at connect (each
    asserted not to stay in asyncpg's statement cache: run once, they are not kept for the connection's life)."""
    made: list[CountingPrepares] = []
    real_connect = db.tls.asyncpg.connect

    async def connect(*args: Any, **kwargs: Any) -> Any:
        made.append(CountingPrepares(await real_connect(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(db.tls.asyncpg, "connect", connect)
    async with db.open_loop():
        with trio.fail_after(10):
            conn = await db.open_source_connection(dsn, statement_timeout_seconds=10)
        cached = len(made[0].real._stmt_cache)
        await conn.close()
    assert cached == 0
    return conn.server, made[0].texts + made[0].fetched


async def test_connect_reads_the_server_facts_in_one_statement(pg15, fresh_db, monkeypatch) -> None:
    server, sent = await connect_counting(pg15.dsn(dbname=fresh_db), monkeypatch)
    expected = pg15.psql("select system_identifier from pg_control_system()", dbname=fresh_db).strip()
    assert server.system_identifier == expected and server.database == fresh_db and server.version_num >= 150000
    assert len(sent) == 1


async def test_a_role_that_may_not_read_the_system_identifier_still_connects(pg15, fresh_db, monitor_role,
                                                                             monkeypatch) -> None:
    pg15.psql("revoke execute on function pg_control_system() from public", dbname=fresh_db)
    name, password = monitor_role
    server, sent = await connect_counting(pg15.dsn(dbname=fresh_db, user=name, password=password), monkeypatch)
    assert server.system_identifier is None and server.database == fresh_db
    assert len(sent) == 2  # the facts with the identifier refused, then the facts alone


async def test_a_new_connection_first_tick_does_not_introspect_record_arrays(pg15, fresh_db, monkeypatch) -> None:
    """Each metric's rows come back as a record[]: its codec is given at connect (reaper.db.RECORD_TYPES), so
    asyncpg does not introspect it in three extra round trips on every connection's first tick."""
    import asyncpg.connection

    introspected: list[list[int]] = []
    real = asyncpg.connection.Connection._introspect_types

    async def noting(self: Any, typeoids: Any, *args: Any) -> Any:
        introspected.append(sorted(typeoids))
        return await real(self, typeoids, *args)

    monkeypatch.setattr(asyncpg.connection.Connection, "_introspect_types", noting)
    batch = {"rows": "select g as n, g::float8 / 3 as f, array[g, 2] as a, 'x' || g as s from generate_series(1, 3) g",
             "nested": "select row(1, 'y')::record as r, array[row(2, 'z')] as ra"}
    (first,), _ = await tick(pg15.dsn(dbname=fresh_db), [batch])
    assert not first.errors
    assert [r["n"] for r in first.rows["rows"]] == [1, 2, 3] and first.rows["rows"][0]["a"] == [1, 2]
    assert first.rows["nested"][0]["r"] == (1, "y") and first.rows["nested"][0]["ra"] == [(2, "z")]
    # record and record[] never (an array column of a metric, int4[] here, is still introspected once, at the
    # connection's first description of it)
    assert not [oids for oids in introspected if {2249, 2287} & set(oids)]


def test_connections_share_one_copy_of_a_metrics_columns(pg15: Any) -> None:
    """A fleet running one preset keeps one tuple of column names per metric, not one per connection."""
    sql = "select 1::int8 as a, 2.5::float8 as b, array[1.5]::float8[] as c"

    async def describe_twice() -> list[tuple[Any, Any]]:
        async with db.open_loop():
            seen = []
            for _ in range(2):
                with trio.fail_after(10):
                    conn = await db.open_source_connection(pg15.dsn(), statement_timeout_seconds=10)
                try:
                    await conn.run_tick(db.TickRequest(batch={"m": sql}))
                    seen.append((conn.columns[sql], conn.shapes[sql]))
                finally:
                    await conn.close()
        return seen

    (cols1, shape1), (cols2, shape2) = trio.run(describe_twice)
    assert cols1 == ("a", "b", "c") and cols1 is cols2
    assert shape1 is not None and shape1.floats == ("b",) and shape1.nested == ("c",) and shape1 is shape2
