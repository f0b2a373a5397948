"""What reaper's statements cost a real PostgreSQL 15 (issue 15 item 3, issue 16 item 1): the per-metric
server time inside the fast lane's one statement, and the budget against a real `reaper run`."""

from __future__ import annotations

import pytest
import trio

from reaper import db

pytestmark = pytest.mark.pg
EPOCH = "(extract(epoch from now()) * 1e9)::int8 as epoch_ns"


def sleeper(seconds: float) -> str:
    return f"select {EPOCH}, pg_sleep({seconds}) is null as slept"


async def test_the_combined_statement_brackets_each_metric_with_its_own_server_time(pg15, fresh_db) -> None:
    batch = {"a_long": sleeper(0.2), "b_short": sleeper(0.05), "c_none": f"select {EPOCH}, 1 as v",
             "d_rows": f"select {EPOCH}, g from generate_series(1, 1000) g"}
    async with db.open_loop():
        conn = await db.open_source_connection(pg15.dsn(dbname=fresh_db), statement_timeout_seconds=10)
        try:
            started = trio.current_time()
            outcome = await conn.run_tick(db.TickRequest(batch=batch, count_active=True))
            elapsed = trio.current_time() - started
        finally:
            await conn.close()
    assert outcome.statements == 1 and not outcome.errors
    s = outcome.seconds
    assert set(s) == set(batch)
    assert 0.2 <= s["a_long"] < 0.26, s  # pg_sleep(0.2) and nothing of the others
    assert 0.05 <= s["b_short"] < 0.09, s
    assert s["c_none"] < 0.01 and s["d_rows"] < 0.05, s
    assert sum(s.values()) <= elapsed  # apportioned: the parts never add up to more than the whole
    assert len(outcome.rows["d_rows"]) == 1000
    assert outcome.active_backends is not None and outcome.active_backends >= 0
