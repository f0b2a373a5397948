"""change_events against a real PostgreSQL 15: DDL, settings and privileges between runs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement
from reaper.special import SpecialContext, special_spec
from reaper.special.changes import CATEGORIES, compare, hash_queries

Runner = Callable[[], Any]


@asynccontextmanager
async def change_runner(dsn: str, state: dict[str, Any] | None = None) -> AsyncIterator[Runner]:
    """A function that runs change_events once over a real connection, as a source would."""
    catalog = Catalog.for_config()
    spec = special_spec("change_events")
    assert spec is not None
    shared = {} if state is None else state
    async with db.open_loop():
        conn = await db.open_source_connection(dsn, statement_timeout_seconds=30)
        try:
            async def run() -> dict[str, list[dict[str, Any]]]:
                ctx = SpecialContext(source=SourceConfig(name="src", dsn=dsn), server=conn.server, conn=conn,
                                     metric=catalog.metrics["change_events"], wall_ns=time.time_ns(), state=shared)
                result: dict[str, list[dict[str, Any]]] = {}
                for table, rows in await spec.handler(ctx):
                    assert table not in result
                    result[table] = rows
                return result

            yield run
        finally:
            await conn.close()


def events(rows: list[dict[str, Any]], *key: str) -> set[tuple[Any, ...]]:
    return {(*(r[k] for k in key), r["event"]) for r in rows}


def test_the_five_hash_queries_exist_for_every_supported_version() -> None:
    for major in (14, 15, 16, 17, 18):
        assert set(hash_queries(major)) == {c.hashes for c in CATEGORIES}


def test_compare_baseline_then_create_alter_drop() -> None:
    tables = next(c for c in CATEGORIES if c.table == "table_changes")
    rows = [{"epoch_ns": 1, "tag_table": "public.a", "md5": "x"}, {"epoch_ns": 1, "tag_table": "public.b", "md5": "y"}]
    state, changes, counts = compare(tables, None, rows, 5)
    assert changes == [] and counts.total == 0 and len(state) == 2
    rows2 = [{"epoch_ns": 2, "tag_table": "public.a", "md5": "x2"},
             {"epoch_ns": 2, "tag_table": "public.c", "md5": "z"}]
    state, changes, counts = compare(tables, state, rows2, 5)
    assert events(changes, "tag_table") == {("public.a", "alter"), ("public.c", "create"), ("public.b", "drop")}
    assert (counts.created, counts.altered, counts.dropped) == (1, 1, 1)
    drop = next(r for r in changes if r["event"] == "drop")
    assert drop == {"epoch_ns": 2, "tag_table": "public.b", "event": "drop"}
    # everything gone: still reported (an error is an error, not an empty result)
    _, changes, counts = compare(tables, state, [], 7)
    assert counts.dropped == 2 and all(r["epoch_ns"] == 7 for r in changes)


def test_compare_settings_never_drop_and_privileges_are_a_set() -> None:
    settings = next(c for c in CATEGORIES if c.table == "configuration_changes")
    state, _, _ = compare(settings, None, [{"tag_setting": "a", "value": "1"}, {"tag_setting": "b", "value": "2"}], 1)
    state, changes, counts = compare(settings, state, [{"tag_setting": "a", "value": "1"}], 1)
    assert changes == [] and counts.total == 0
    both = [{"tag_setting": "a", "value": "1"}, {"tag_setting": "b", "value": "2"}]
    _, changes, _ = compare(settings, state, both, 1)
    assert changes == []  # a setting that comes back was never gone
    privs = next(c for c in CATEGORIES if c.table == "privilege_changes")
    row = {"object_type": "table", "tag_role": "r", "tag_object": "public.t", "privilege_type": "SELECT"}
    state, _, _ = compare(privs, None, [], 1)
    _, changes, counts = compare(privs, state, [row, dict(row)], 1)  # the same grant from two grantors
    assert [c["event"] for c in changes] == ["GRANT"] and counts.created == 1


@pytest.mark.pg
async def test_ddl_settings_and_privileges_are_detected(pg15, fresh_db, monitor_role) -> None:
    role, password = monitor_role
    dsn = pg15.dsn(user=role, dbname=fresh_db, password=password)
    pg15.psql("create table pre_existing (id int primary key); create function pre_f() returns int "
              "language sql as 'select 1'", dbname=fresh_db)
    async with change_runner(dsn) as run:
        assert await run() == {}  # the first run is the baseline: nothing is reported
        assert await run() == {}  # and nothing changed since

        pg15.psql("create table t1 (a int); create index t1_a on t1 (a);"
                  "create function f1(x int) returns int language sql as 'select x'", dbname=fresh_db)
        got = await run()
        assert events(got["table_changes"], "tag_table") == {("public.t1", "create")}
        assert events(got["index_changes"], "tag_index") == {("public.t1_a", "create")}
        assert events(got["sproc_changes"], "tag_sproc") == {("public.f1", "create")}
        created = got["sproc_changes"][0]
        assert set(created) == {"epoch_ns", "tag_oid", "tag_sproc", "md5", "event"}
        assert got["index_changes"][0]["table"] == "public.t1"
        # a new function is executable by PUBLIC: a privilege appears too
        assert events(got["privilege_changes"], "object_type", "tag_role", "tag_object", "privilege_type") == {
            ("function", "PUBLIC", "f1(integer)", "EXECUTE", "GRANT")}
        assert got["change_events"] == [{"epoch_ns": got["change_events"][0]["epoch_ns"], "details":
                                         "functions: 1/0/0 tables: 1/0/0 indexes: 1/0/0 settings: 0/0/0 "
                                         "privileges: 1/0/0"}]
        assert await run() == {}  # reported once

        pg15.psql("alter table t1 add column b text; drop index t1_a;"
                  "create or replace function f1(x int) returns int language sql as 'select x + 1';"
                  f"grant select on t1 to {role}", dbname=fresh_db)
        got = await run()
        assert events(got["table_changes"], "tag_table") == {("public.t1", "alter")}
        assert got["index_changes"] == [{"epoch_ns": got["index_changes"][0]["epoch_ns"], "tag_index": "public.t1_a",
                                         "event": "drop"}]
        assert events(got["sproc_changes"], "tag_sproc") == {("public.f1", "alter")}
        assert events(got["privilege_changes"], "object_type", "tag_role", "tag_object", "privilege_type") == {
            ("table", role, "public.t1", "SELECT", "GRANT")}
        assert got["change_events"][0]["details"] == ("functions: 0/1/0 tables: 0/1/0 indexes: 0/0/1 "
                                                      "settings: 0/0/0 privileges: 1/0/0")

        pg15.psql(f"revoke select on t1 from {role}; drop table t1; drop function f1(int)", dbname=fresh_db)
        got = await run()
        assert events(got["table_changes"], "tag_table") == {("public.t1", "drop")}
        assert events(got["sproc_changes"], "tag_sproc") == {("public.f1", "drop")}
        assert events(got["privilege_changes"], "tag_role", "tag_object", "privilege_type") == {
            (role, "public.t1", "SELECT", "REVOKE"), ("PUBLIC", "f1(integer)", "EXECUTE", "REVOKE")}
        assert "index_changes" not in got
        assert got["change_events"][0]["details"] == ("functions: 0/0/1 tables: 0/0/1 indexes: 0/0/0 "
                                                      "settings: 0/0/0 privileges: 0/0/2")

        try:
            pg15.psql("alter system set work_mem = '7MB'; select pg_reload_conf()")
            changes: list[dict[str, Any]] = []
            with trio.fail_after(20):  # each backend applies the reload when it next gets a command
                while not changes:
                    changes = (await run()).get("configuration_changes", [])
                    await trio.sleep(0.1)
            assert changes == [{"epoch_ns": changes[0]["epoch_ns"], "tag_setting": "work_mem", "value": "7168",
                                "event": "alter"}]
        finally:
            pg15.psql("alter system reset work_mem; select pg_reload_conf()")


@pytest.mark.pg
async def test_changes_are_delivered_by_the_source_and_survive_an_update(pg15, fresh_db, monitor_role) -> None:
    role, password = monitor_role
    config = SourceConfig(name="chg", dsn=pg15.dsn(user=role, dbname=fresh_db, password=password),
                          metrics={"change_events": 1})
    catalog = Catalog.for_config()
    got: list[Measurement] = []
    reaper = SourceReaper(config, catalog, got.append)
    async with db.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        with trio.fail_after(20):
            while reaper.state.last_fetch.get("change_events") is None:  # the baseline run
                await trio.sleep(0.05)
        reaper.update(SourceConfig(name="chg", dsn=config.dsn, metrics={"change_events": 1}, tags={"a": "b"}),
                      catalog)  # what a SIGHUP does when the source's connection did not change
        pg15.psql("create table after_update (x int)", dbname=fresh_db)
        with trio.fail_after(20):
            while not any(m.table == "change_events" for m in got):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    tables = {m.table: m for m in got}
    assert set(tables) == {"table_changes", "change_events"}  # nothing else: the baseline was kept
    assert all(m.metric == "change_events" for m in got)
    (row,) = tables["table_changes"].rows
    assert row["tag_table"] == "public.after_update" and row["event"] == "create"
    assert row["real_dbname"] == fresh_db
    assert tables["table_changes"].tags == {"a": "b"}
    assert "tables: 1/0/0" in tables["change_events"].rows[0]["details"]


def test_an_unchanged_category_is_not_compared_row_by_row_and_a_change_still_is(monkeypatch) -> None:
    """The signature fast path (issue 14): the same rows in the same order skip compare(); any change in
    a key or a compared column (or a new order) goes through it and is reported."""
    from reaper.special import changes

    category = next(c for c in changes.CATEGORIES if c.hashes == "table_hashes")
    rows = [{"epoch_ns": 1, "tag_table": f"public.t{i}", "md5": f"h{i}"} for i in range(50)]
    first = changes.signature(category, rows)
    later = [{**r, "epoch_ns": 2} for r in rows]  # a later run: only the time differs
    assert changes.signature(category, later) == first
    altered = [dict(r) for r in later]
    altered[7]["md5"] = "changed"
    assert changes.signature(category, altered) != first
    assert changes.signature(category, list(reversed(later))) != first
    assert changes.signature(category, [{"epoch_ns": 1}]) is None  # a row without the columns: compared
    # a value that cannot be hashed (an array column, say) is compared row by row, never a crash
    assert changes.signature(category, [{"epoch_ns": 1, "tag_table": "t", "md5": ["a", "b"]}]) is None
    assert isinstance(first, int)  # a digest: the values themselves are kept once, in the state's hashes
