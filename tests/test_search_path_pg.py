"""Whose code a metric's unqualified names run: never the monitored database's owner's (reaper.db.facts).

A database's owner (an application's role, not a superuser) can set the database's search_path
(`ALTER DATABASE ... SET search_path = evil, pg_catalog`) and create a schema named like the monitoring role
("$user", searched first by default). Either way a metric's `pg_is_in_recovery()` or `pg_stat_statements`
would be the owner's function or view, run in reaper's session with reaper's role: a superuser's, often.
The read-only transaction stops writes to tables, not what such a function can do as a superuser
(COPY ... TO PROGRAM). reaper pins search_path for its sessions: pg_catalog, the source's `search_path`
schemas (default public), the installed extensions' schemas. These tests are the owner's attack, run
through the real CLI against a real server, and what a custom metric reading an application's schema sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from test_daemon import Daemon, wait_until
from test_lanes_pg import metric_toml

from reaper import db

pytestmark = pytest.mark.pg

REAPER = [sys.executable, "-m", "reaper.cli"]
HIJACK = "hijacked by the database owner"  # (made at run time: the fixture's own text is in pg_stat_statements)


@pytest.fixture
def owned_db(pg15, fresh_db: str) -> Iterator[str]:
    """fresh_db, owned by an application role that plants its functions and views where reaper would look."""
    owner = f"app_{uuid.uuid4().hex[:8]}"
    monitor = pg15.psql("select current_user")
    boom = "begin raise exception 'hijacked by %', 'the database owner'; end"
    pg15.psql(f"create role {owner}; alter database {fresh_db} owner to {owner};"
              "create extension if not exists pg_stat_statements", dbname=fresh_db)
    pg15.psql(f"set role {owner}; create schema evil; create schema app;"
              "create table app.orders(id int); insert into app.orders values (1), (2), (3);"
              f"create function evil.pg_is_in_recovery() returns boolean language plpgsql as $${boom}$$;"
              f"create function evil.now() returns timestamptz language plpgsql as $${boom}$$;"
              f"create function evil.current_database() returns name language plpgsql as $${boom}$$;"
              f"create function evil.boom() returns bigint language plpgsql as $${boom}$$;"
              # "$user": a schema named like the monitoring role, searched before public, with a view named like
              # the extension's
              f'create schema "{monitor}";'
              f'create view "{monitor}".pg_stat_statements as select * from public.pg_stat_statements'
              " where evil.boom() > 0;"
              f"alter database {fresh_db} set search_path = evil, \"$user\", public, pg_catalog", dbname=fresh_db)
    yield fresh_db
    pg15.psql(f"reassign owned by {owner} to {monitor}; drop owned by {owner}; drop role {owner}", dbname=fresh_db)


def once(pg15, dbname: str, tmp_path: Path, source_keys: str = "", metrics: str = "",
         own: str = "") -> tuple[subprocess.CompletedProcess[str], dict[str, dict]]:
    config = tmp_path / "c.toml"
    config.write_text(f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=dbname)}"\n{source_keys}\n'
                      f"metrics = {{ {metrics} }}\n"
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n{own}')
    done = subprocess.run([*REAPER, "once", "--config", str(config), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    results = {r["metric"]: r for r in json.loads(done.stdout or "[]")}
    return done, results


def test_the_database_owners_search_path_runs_none_of_its_code(pg15, owned_db: str, tmp_path: Path) -> None:
    done, results = once(pg15, owned_db, tmp_path,
                         metrics="db_stats = 60, instance_up = 60, stat_statements = 60, wal = 60")
    assert HIJACK not in done.stdout + done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert {"db_stats", "instance_up", "stat_statements", "wal"} <= {m for m, r in results.items() if r["rows"]}
    # the database's own setting is left as its owner made it, for every other client
    assert "evil" in pg15.psql("show search_path", dbname=owned_db)


def test_a_metric_reading_an_applications_schema_is_told_where_names_are_looked_up(
        pg15, owned_db: str, tmp_path: Path) -> None:
    own = ('[metrics.orders.sql]\n11 = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, '
           'count(*) as n from orders"\n')
    done, results = once(pg15, owned_db, tmp_path, metrics="orders = 60", own=own)
    assert results["orders"]["rows"] == []
    (line,) = [x for x in done.stderr.splitlines() if "orders" in x and "ERROR" in x]
    assert 'relation "orders" does not exist' in line
    assert "search_path = pg_catalog, public" in line and "add its schema to the source's search_path" in line

    done, results = once(pg15, owned_db, tmp_path, source_keys='search_path = ["app"]', metrics="orders = 60",
                         own=own)
    assert results["orders"]["rows"][0]["n"] == 3, done.stderr


def test_a_reload_that_lists_the_schema_reconnects_and_the_metric_collects(pg15, owned_db: str,
                                                                        tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.write_config([("a", pg15.dsn(dbname=owned_db), 1)],
                   metric_toml("orders", "an application table", "count(*) as n from orders"))
    d.config.write_text(d.config.read_text().replace("metrics = { ping = 1 }", "metrics = { ping = 1, orders = 1 }"))
    d.start()
    try:
        wait_until(lambda: "metric orders: failed" in d.log_text(), 30, "the orders metric's first failure")
        assert "search_path = pg_catalog, public" in d.log_text()
        d.config.write_text(d.config.read_text().replace("connect_timeout_seconds = 2\n",
                                                         'connect_timeout_seconds = 2\nsearch_path = ["app"]\n'))
        answer = d.reload()
        assert answer.returncode == 0, answer.stdout + answer.stderr
        # (both lanes' connections: an update in place would have left the fast lane's with the old path)
        assert "search_path forces a new connection" in answer.stdout, answer.stdout
        wait_until(lambda: any(line["metric"] == "orders" for line in d.lines()), 30, "the orders metric's rows")
    finally:
        assert d.stop() == 0
    assert HIJACK not in d.log_text()


@pytest.mark.parametrize(("table", "key", "value"), [("[[sources]]", "sources[0].search_path", "app, public"),
                                                    ("[collector]", "collector.create_extensions", "pgstattuple")])
def test_a_string_where_the_list_belongs_is_refused_not_split(tmp_path: Path, table: str, key: str,
                                                              value: str) -> None:
    config = tmp_path / "c.toml"
    source = '[[sources]]\nname = "a"\ndsn = "postgresql://m@db1/app"\n'
    line = f'{key.split(".")[-1]} = "{value}"\n'
    config.write_text(f'{source}{line if table == "[[sources]]" else ""}[[sinks]]\ntype = "jsonfile"\n'
                      f'path = "out.ndjson"\n{"" if table == "[[sources]]" else table + chr(10) + line}')
    done = subprocess.run([*REAPER, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{config}: {key}: expected a list of strings ([\"a\", \"b\"]), got '{value}'"]


def test_check_connect_names_a_search_path_schema_the_database_lacks(pg15, owned_db: str, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=owned_db)}"\nsearch_path = ["app", "aap"]\n'
                      'metrics = { db_stats = 60 }\n[[sinks]]\ntype = "jsonfile"\npath = "o.ndjson"\n')
    done = subprocess.run([*REAPER, "check", "--connect", "--config", str(config), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (source,) = json.loads(done.stdout)["sources"]
    assert (source["search_path"], source["absent_schemas"]) == ("pg_catalog, app, aap, public", ["aap"])
    done = subprocess.run([*REAPER, "check", "--connect", "--config", str(config), "--format", "plain"],
                          capture_output=True, text=True, timeout=120)
    assert "note\ta\tits search_path names schemas this database lacks: aap" in done.stdout.splitlines()


@pytest.mark.parametrize(("value", "problem"), [
    ('["$$user", "public"]', 'search_path[0]: "$user" is not taken: name the schema (its owner would decide what the'
                             " metrics run)"),
    ('["app, public"]', "search_path[0]: 'app, public' is one schema name, not a list: write one string per schema"),
])
def test_a_search_path_that_would_not_do_what_it_says_is_refused(tmp_path: Path, value: str, problem: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[sources]]\nname = "a"\ndsn = "postgresql://m@db1/app"\nsearch_path = {value}\n'
                      '[[sinks]]\ntype = "jsonfile"\npath = "o.ndjson"\n')
    done = subprocess.run([*REAPER, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"{config}: sources[0].{problem}"]


@pytest.mark.parametrize("dsn", ["postgresql://m@db1/app?search_path=app",
                                 "host=db1 dbname=app options='-c search_path=app'"])
def test_a_search_path_in_the_dsn_is_refused_not_silently_replaced(tmp_path: Path, dsn: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[sources]]\nname = "a"\ndsn = "{dsn}"\n[[sinks]]\ntype = "jsonfile"\npath = "o.ndjson"\n')
    done = subprocess.run([*REAPER, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{config}: sources[0].dsn: search_path in the dsn is not used (reaper pins the names its metrics see): "
        "list the schemas in the source's search_path key"]


async def test_an_extension_created_by_reaper_lands_in_public_and_is_found(pg15, fresh_db: str) -> None:
    pg15.psql("create schema tools; create extension pg_buffercache schema tools", dbname=fresh_db)
    async with db.open_loop():
        with trio.fail_after(30):
            conn = await db.open_source_connection(pg15.dsn(dbname=fresh_db), statement_timeout_seconds=10,
                                                   search_path=())
        try:  # the extensions' schemas are searched, public only when an extension lives there
            assert conn.server.search_path == "pg_catalog, tools"
            assert (await conn.fetch("select count(*) > 0 as ok from pg_buffercache"))[0]["ok"]
            assert await conn.create_extensions(["pgstattuple"]) == {"pgstattuple": None}
            assert conn.server.search_path == "pg_catalog, tools, public"
            rows = await conn.fetch("select n.nspname from pg_extension e join pg_namespace n"
                                    " on n.oid = e.extnamespace where e.extname = 'pgstattuple'")
            assert rows == [{"nspname": "public"}]
            assert (await conn.fetch("select tuple_count >= 0 as ok from pgstattuple('pg_class')"))[0]["ok"]
        finally:
            await conn.close()
