"""pgwatch's config database: reading its source list (read-only) and creating its schema.

Trio-flavoured, like the rest of reaper.db. pgwatch v3 keeps its sources in the table
`pgwatch.source` (one row per monitored source) beside `pgwatch.preset`, `pgwatch.metric` and
`pgwatch.migration`. reaper reads `pgwatch.source` with one short-lived, read-only connection per
refresh (a refresh every couple of minutes does not justify a connection kept open); each row comes
back as a JSON object of its columns (`to_jsonb(row)`), so a column that a newer or older pgwatch
added or dropped is seen by name, never misread by position. Every failure is SourceUnavailable:
the caller keeps its last list.

`init_config_db` creates the schema (the DDL below is reaper's own, written to be compatible with
pgwatch v3's: same tables, columns, defaults and checks), fills `pgwatch.preset` with the presets
reaper ships (the source table's preset columns reference it) and records pgwatch's migration steps,
so that pgwatch and reaper can share one config database. It changes nothing in a database that has
the schema already.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import asyncpg
import trio
from trio_asyncio import aio_as_trio

from reaper.db import connect_options, describe_error, pooler, tls
from reaper.errors import SourceUnavailable

SOURCE_ROWS_SQL = "select (select set_config('transaction_read_only', 'on', true)) as ro, " \
                  "to_jsonb(s) as row from pgwatch.source s order by s.name"
UNDEFINED_TABLE = "42P01"
INVALID_SCHEMA = "3F000"
CLOSE_TIMEOUT_SECONDS = 2.0

# pgwatch v3's config schema, written for reaper (column names, types, defaults and checks as pgwatch's,
# so pgwatch reads a database reaper created, and the other way round).
SCHEMA_DDL = r"""
create schema if not exists pgwatch;

create table if not exists pgwatch.metric (
    name text primary key,
    sqls jsonb not null,
    init_sql text,
    description text,
    node_status text,
    gauges text[],
    is_instance_level bool not null default false,
    storage_name text
);

create table if not exists pgwatch.preset (
    name text primary key,
    description text not null,
    metrics jsonb not null,
    sort_order int not null default 0
);

create or replace function pgwatch.update_preset() returns trigger language plpgsql as $fn$
begin
    -- a metric renamed or removed is renamed or removed in every preset that lists it
    if tg_op = 'DELETE' then
        update pgwatch.preset set metrics = metrics - old.name where metrics ? old.name;
    elsif tg_op = 'UPDATE' and old.name <> new.name then
        update pgwatch.preset set metrics = jsonb_set(metrics - old.name, array[new.name], metrics -> old.name)
         where metrics ? old.name;
    end if;
    return null;
end
$fn$;

do $do$
begin
    if not exists (select from pg_trigger
                   where tgname = 'update_preset_trigger' and tgrelid = 'pgwatch.metric'::regclass) then
        create trigger update_preset_trigger after delete or update of name on pgwatch.metric
            for each row execute function pgwatch.update_preset();
    end if;
end
$do$;

create table if not exists pgwatch.source (
    name text not null primary key,
    connstr text not null,
    is_superuser boolean not null default false,
    preset_config text references pgwatch.preset (name) default 'basic',
    config jsonb,
    is_enabled boolean not null default true,
    last_modified_on timestamptz not null default now(),
    dbtype text not null default 'postgres',
    include_pattern text,
    exclude_pattern text,
    custom_tags jsonb,
    "group" text not null default 'default',
    host_config jsonb,
    only_if_master bool not null default false,
    preset_config_standby text references pgwatch.preset (name),
    config_standby jsonb,
    constraint preset_or_custom_config
        check (coalesce(preset_config, config::text) is not null and (preset_config is null or config is null)),
    constraint preset_or_custom_config_standby check (preset_config_standby is null or config_standby is null),
    check (dbtype in ('postgres', 'pgbouncer', 'postgres-continuous-discovery', 'patroni', 'pgpool')),
    check ("group" ~ E'\\w+')
);

create table if not exists pgwatch.migration (
    id bigint primary key,
    version text not null
);
"""

# pgwatch counts the rows of pgwatch.migration to decide whether its schema needs an upgrade: the
# steps its v3 schema already contains, one row each (the texts are ours).
MIGRATIONS = (
    (0, "00179 v3 config schema (created by reaper)"),
    (1, "00824 recommendations metrics use storage_name (created by reaper)"),
    (2, "01050 preset.sort_order (created by reaper)"),
)


async def read_source_rows(dsn: str, *, password_file: str | None = None,
                           statement_timeout_seconds: float = 30.0) -> list[dict[str, Any]]:
    """Every row of `pgwatch.source`, as {column: value} (jsonb columns decoded), sorted by name.

    The caller bounds the whole call with a trio cancel scope. Raises SourceUnavailable for every
    failure: unreachable, refused, no such schema or table (with a hint), a bad dsn."""
    kwargs = await connect_options(statement_timeout_seconds=statement_timeout_seconds,
                                   password_file=password_file, statement_cache_size=0)
    try:
        return await aio_as_trio(_read_rows)(dsn, kwargs)
    except trio.Cancelled:
        raise
    except asyncpg.PostgresError as e:
        if getattr(e, "sqlstate", None) in (UNDEFINED_TABLE, INVALID_SCHEMA):
            raise SourceUnavailable("no table pgwatch.source: not a pgwatch config database (create one with "
                                    "`reaper config-db init --dsn ...`)") from e
        raise SourceUnavailable(f"reading pgwatch.source failed: {describe_error(e)}") from e
    except (OSError, ValueError, asyncpg.InterfaceError, TimeoutError, ConnectionError, EOFError) as e:
        raise SourceUnavailable(f"reading pgwatch.source failed: {describe_error(e)}") from e


async def _close(conn: Any) -> None:
    try:
        await conn.close(timeout=CLOSE_TIMEOUT_SECONDS)  # a polite Terminate: no "unexpected EOF" in the server log
    except Exception:
        conn.terminate()


async def _read_rows(dsn: str, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    conn, _ = await pooler.connect(dsn, kwargs)
    try:
        records = await conn.fetch(SOURCE_ROWS_SQL)
    except BaseException:
        conn.terminate()
        raise
    await _close(conn)
    return [json.loads(r["row"]) for r in records]


async def init_config_db(dsn: str, presets: Iterable[tuple[str, str, dict[str, int]]], *,
                         password_file: str | None = None, statement_timeout_seconds: float = 60.0) -> str:
    """Create pgwatch's config schema in the database `dsn` names, in one transaction; presets are
    (name, description, {metric: seconds}) rows added where missing. Returns what was done, one line.

    Raises SourceUnavailable when the database cannot be reached or refuses (e.g. no CREATE right)."""
    kwargs = await connect_options(statement_timeout_seconds=statement_timeout_seconds,
                                   password_file=password_file, read_only=False, statement_cache_size=0)
    rows = [(name, description, json.dumps(metrics)) for name, description, metrics in presets]
    try:
        return await aio_as_trio(_init)(dsn, kwargs, rows)
    except trio.Cancelled:
        raise
    except (asyncpg.PostgresError, OSError, ValueError, asyncpg.InterfaceError, TimeoutError, ConnectionError,
            EOFError) as e:
        raise SourceUnavailable(f"creating the config schema failed: {describe_error(e)}") from e


async def _init(dsn: str, kwargs: dict[str, Any], presets: list[tuple[str, str, str]]) -> str:
    conn = await tls.connect(dsn, kwargs)
    try:
        async with conn.transaction():
            existed = await conn.fetchval("select to_regclass('pgwatch.source') is not null")
            if not existed:
                await conn.execute(SCHEMA_DDL)
                await conn.executemany("insert into pgwatch.preset (name, description, metrics, sort_order) "
                                       "values ($1, $2, $3::jsonb, 0) on conflict (name) do nothing", presets)
                await conn.executemany("insert into pgwatch.migration (id, version) values ($1, $2) "
                                       "on conflict (id) do nothing", MIGRATIONS)
    except BaseException:
        conn.terminate()
        raise
    await _close(conn)
    if existed:
        return "the pgwatch config schema exists already; nothing changed"
    return (f"created the pgwatch config schema (tables source, preset, metric, migration; "
            f"{len(presets)} presets)")
