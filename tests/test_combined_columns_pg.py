"""A metric's column may have any name in the tick's combined statement (real PostgreSQL 15).

The combined statement aggregates each metric's rows as `array_agg(t.*)` over the subquery aliased t; with a
bare `array_agg(t)`, a metric column named t would be aggregated instead of the row (a text value came back
as its first character, an integer broke the tick).
"""

from __future__ import annotations

import pytest
import trio

from reaper import db

pytestmark = pytest.mark.pg


async def test_a_metric_column_named_like_the_row_alias_is_delivered_as_it_is(pg15, fresh_db) -> None:
    batch = {"text_t": "select 'hello' as t, 2 as n", "int_t": "select 42 as t", "plain": "select 1 as one"}
    async with db.open_loop():
        with trio.fail_after(10):
            conn = await db.open_source_connection(pg15.dsn(dbname=fresh_db), statement_timeout_seconds=10)
        try:
            outcome = await conn.run_tick(db.TickRequest(batch=batch))
        finally:
            await conn.close()
    assert not outcome.errors and not outcome.isolated and outcome.statements == 1
    assert outcome.rows == {"text_t": [{"t": "hello", "n": 2}], "int_t": [{"t": 42}], "plain": [{"one": 1}]}
