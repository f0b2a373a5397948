"""A metric's own statement_timeout_seconds as a session setting (issue 14): counted against a real PostgreSQL 15.

The connection remembers the statement_timeout it last gave its session. A run under the timeout the session
already has sends ONE statement (the metric's, read-only as always); a different timeout, or the connect
default after a timed run, sends one set_config/RESET first. The server still cancels a statement past its
own timeout, and every later statement still runs under the timeout it asked for.
"""

from __future__ import annotations

import pytest
import trio

from reaper import db
from reaper.errors import MetricError

pytestmark = pytest.mark.pg

DEFAULT_SECONDS = 10  # the connection's statement_timeout (set at connect)
SHOW = "select current_setting('statement_timeout') as timeout"
SLEEP = "select pg_sleep(3) is null as slept"


async def connect(dsn: str) -> db.SourceConnection:
    with trio.fail_after(10):
        return await db.open_source_connection(dsn, statement_timeout_seconds=DEFAULT_SECONDS)


async def counted(conn: db.SourceConnection, name: str, query: db.SoloQuery) -> tuple[object, int]:
    """(rows or the MetricError's message, statements the run sent by the link's own counter)."""
    before = conn.statements
    try:
        result: object = await conn.run_one(name, query)
    except MetricError as e:
        result = e.message
    return result, conn.statements - before


async def test_a_timed_metric_sends_one_statement_when_the_session_has_its_timeout(pg15, fresh_db) -> None:
    async with db.open_loop():
        conn = await connect(pg15.dsn(dbname=fresh_db))
        try:
            first, sent_first = await counted(conn, "slow", db.SoloQuery(SLEEP, statement_timeout_seconds=1))
            second, sent_second = await counted(conn, "show", db.SoloQuery(SHOW, statement_timeout_seconds=1))
            third, sent_third = await counted(conn, "slow", db.SoloQuery(SLEEP, statement_timeout_seconds=1))
            other, sent_other = await counted(conn, "show", db.SoloQuery(SHOW, statement_timeout_seconds=2))
            default, sent_default = await counted(conn, "show", db.SoloQuery(SHOW))
            again, sent_again = await counted(conn, "show", db.SoloQuery(SHOW))
            before = conn.statements
            tick = await conn.run_tick(db.TickRequest(batch={"show": SHOW}))
            sent_tick = conn.statements - before
            await conn.run_one("show", db.SoloQuery(SHOW, statement_timeout_seconds=1))
            fetched = await conn.fetch(SHOW)  # special metrics' reads get the default back too
            read_only = await conn.fetch("select current_setting('default_transaction_read_only') as ro")
        finally:
            await conn.close()
    # the server cancelled the 3 s sleep at 1 s: the first run set the timeout, then ran alone
    assert "statement timeout" in str(first) and sent_first == 2
    assert second == [{"timeout": "1s"}] and sent_second == 1  # same timeout: one statement, still under 1 s
    assert "statement timeout" in str(third) and sent_third == 1  # and the server still cancels it
    assert other == [{"timeout": "2s"}] and sent_other == 2  # another timeout: one set_config first
    assert default == [{"timeout": f"{DEFAULT_SECONDS}s"}] and sent_default == 2  # the default back: RESET first
    assert again == default and sent_again == 1
    assert tick.rows["show"] == default and tick.statements == sent_tick == 1
    assert fetched == default
    assert read_only == [{"ro": "on"}]  # the session stays read-only by default


async def test_a_tick_orders_its_timed_groups_to_change_the_timeout_least(pg15, fresh_db) -> None:
    request = db.TickRequest(batch={"d": SHOW},
                             timed={"a": db.SoloQuery(SHOW, statement_timeout_seconds=2)})
    async with db.open_loop():
        conn = await connect(pg15.dsn(dbname=fresh_db))
        try:
            outcomes = [await conn.run_tick(request) for _ in range(3)]
            late = await conn.run_tick(db.TickRequest(batch={}, timed={"s": db.SoloQuery(SLEEP, 1)}))
            after = await conn.run_tick(db.TickRequest(batch={"d": SHOW}))
        finally:
            await conn.close()
    for outcome in outcomes:
        assert outcome.rows == {"d": [{"timeout": f"{DEFAULT_SECONDS}s"}], "a": [{"timeout": "2s"}]}, outcome
        assert not outcome.errors and not outcome.isolated
    # the batch and the group (2 statements) and one change of timeout in between; in a read-only
    # transaction with SET LOCAL it was 1 + 4 a tick
    assert [o.statements for o in outcomes] == [3, 3, 3]
    assert "statement timeout" in late.errors["s"] and late.isolated
    assert after.rows == {"d": [{"timeout": f"{DEFAULT_SECONDS}s"}]} and not after.errors
