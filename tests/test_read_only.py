"""The read-only promise at run time: whatever a metric's SQL does, nothing it runs can write.

`reaper check` refuses metric SQL with side effects (tests/test_metric_lint.py). These tests go around
that check on purpose (SQL handed straight to the connection) to prove the second line: every statement
reaper sends makes its own transaction read-only first, so that a session setting switched off by one
statement (`set_config('default_transaction_read_only', 'off', false)`) cannot make the next one write.
Each attack runs as a superuser and as a pg_monitor role that was GRANTed the rights to write, so a
failure can only come from the read-only transaction, not from missing privileges.
"""

from __future__ import annotations

import pytest
import trio

from reaper import db
from reaper.errors import MetricError

pytestmark = pytest.mark.pg

FLIP = "select set_config('default_transaction_read_only', 'off', false) as flipped"


@pytest.fixture(params=["superuser", "pg_monitor"])
def target(request: pytest.FixtureRequest, pg15, fresh_db: str, monitor_role) -> str:
    pg15.psql("create table victim(id int); insert into victim values (1), (2); create sequence seq;"
              "create function evil() returns int language plpgsql as "
              "$$ begin insert into victim values (99); return 1; end $$;", dbname=fresh_db)
    name, password = monitor_role
    pg15.psql(f"grant select, insert, delete on victim to {name}; grant usage, update on sequence seq to {name};"
              f"grant execute on function evil() to {name}", dbname=fresh_db)
    if request.param == "superuser":
        return str(pg15.dsn(dbname=fresh_db))
    return str(pg15.dsn(user=name, password=password, dbname=fresh_db))


def untouched(pg15, dbname: str) -> bool:
    """victim still holds its two rows and the sequence was never advanced."""
    return pg15.psql("select count(*) || '|' || (select is_called from seq) from victim", dbname=dbname) == "2|false"


async def connect(dsn: str) -> db.SourceConnection:
    with trio.fail_after(10):
        return await db.open_source_connection(dsn, statement_timeout_seconds=10)


async def test_a_switched_off_default_does_not_let_the_next_tick_write(target: str, pg15, fresh_db: str) -> None:
    async with db.open_loop():
        conn = await connect(target)
        try:
            first = await conn.run_tick(db.TickRequest(batch={"flip": FLIP}))
            assert first.rows["flip"] == [{"flipped": "off"}]  # the setting did change for the session...
            second = await conn.run_tick(db.TickRequest(batch={
                "next": "select nextval('seq') as v", "write": "select evil() as e", "ok": "select 1 as one"}))
            # ...but each statement is read-only anyway: the writers fail alone, the reader is delivered
            assert set(second.errors) == {"next", "write"}
            assert all("read-only transaction" in message for message in second.errors.values())
            assert second.rows["ok"] == [{"one": 1}]
            with pytest.raises(MetricError, match="read-only transaction"):
                await conn.run_one("alone", db.SoloQuery("select nextval('seq') as v"))
            with pytest.raises(MetricError, match="read-only transaction"):
                await conn.run_one("timed", db.SoloQuery("select evil() as e", statement_timeout_seconds=5))
        finally:
            await conn.close()
    assert untouched(pg15, fresh_db)


async def test_a_metric_cannot_make_its_own_transaction_read_write(target: str, pg15, fresh_db: str) -> None:
    sql = "select set_config('transaction_read_only', 'off', true) as x, nextval('seq') as v"
    async with db.open_loop():
        conn = await connect(target)
        try:
            outcome = await conn.run_tick(db.TickRequest(batch={"sneaky": sql}))
            assert "sneaky" in outcome.errors and "sneaky" not in outcome.rows
            with pytest.raises(MetricError):
                await conn.run_one("sneaky", db.SoloQuery(sql))
        finally:
            await conn.close()
    assert untouched(pg15, fresh_db)


async def test_a_data_modifying_cte_run_alone_deletes_nothing(target: str, pg15, fresh_db: str) -> None:
    """Before the guard, a metric that failed in the combined statement was re-run alone, at the top level,
    where a data-modifying WITH is allowed: it deleted the row."""
    sql = "with d as (delete from victim where id = 1 returning 1) select count(*) as n from d"
    async with db.open_loop():
        conn = await connect(target)
        try:
            await conn.run_tick(db.TickRequest(batch={"flip": FLIP}))
            outcome = await conn.run_tick(db.TickRequest(batch={"cte": sql}))
            assert "cte" in outcome.errors
            with pytest.raises(MetricError):
                await conn.run_one("cte", db.SoloQuery(sql))
            with pytest.raises(Exception, match=r"WITH|read-only"):
                await conn.fetch(sql)
        finally:
            await conn.close()
    assert untouched(pg15, fresh_db)
