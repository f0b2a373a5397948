"""The `postgres` sink against a real PostgreSQL 15: schema, writes, partitions, retention, outages."""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from pgserver import PgServer, quote_ident

from reaper import db
from reaper.config.load import load_config
from reaper.config.schema import CollectorConfig, Config, PostgresSinkConfig, SourceConfig
from reaper.db.storage import StorageError, init_storage, open_storage
from reaper.db.storage_schema import (
    CHANGE_TABLES,
    DASHBOARD_TABLES,
    LATEST_VERSION,
    METRIC_TABLES,
    partition_start_ns,
)
from reaper.errors import ConfigError
from reaper.measurement import Measurement
from reaper.sinks.postgres import PostgresSink, encode_batch, measurement_key

DAY_NS = 86400 * 10**9
HOUR_NS = 3600 * 10**9


def rows_of(server, sql: str, dbname: str) -> list[list[str]]:
    out = server.psql(sql, dbname=dbname)
    return [line.split("|") for line in out.splitlines()] if out else []


def one(server, sql: str, dbname: str) -> str:
    return server.psql(sql, dbname=dbname)


def sink_config(dsn: str, **kwargs) -> PostgresSinkConfig:
    kwargs.setdefault("batching_delay_seconds", 0.01)  # the smallest the config accepts
    return PostgresSinkConfig(dsn=dsn, **kwargs)


def measurement(source: str, epoch_ns: int, *, metric: str = "db_stats", table: str | None = None,
                rows: list[dict] | None = None, tags: dict[str, str] | None = None) -> Measurement:
    if rows is None:
        rows = [{"epoch_ns": epoch_ns, "tag_datname": source, "xact_commit": epoch_ns % 1000, "numbackends": 3}]
    return Measurement(source=source, metric=metric, table=table or metric, epoch_ns=epoch_ns, rows=rows,
                       tags=tags or {})


async def write_all(config: PostgresSinkConfig, *batches: list[Measurement]) -> PostgresSink:
    sink = PostgresSink(config)
    async with db.open_loop():
        await sink.open()
        try:
            for batch in batches:
                await sink.write(batch)
        finally:
            await sink.aclose()
    return sink


def partitions(server, dbname: str, table: str) -> dict[str, tuple[str, str]]:
    got = rows_of(server, f"""
        select c.relname, b.lower_bound at time zone 'UTC', b.upper_bound at time zone 'UTC'
        from admin.reaper_partition_bounds('public.{quote_ident(table)}'::regclass) b
        join pg_class c on c.oid = b.partition_name
        where c.relnamespace = 'subpartitions'::regnamespace""", dbname)
    return {name: (lo, hi) for name, lo, hi in got}


def utc(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)


# -- no database -------------------------------------------------------------------------------------


def test_invalid_settings_are_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[sinks]]\ntype = "postgres"\ndsn = "postgresql://x/y"\npartition_interval = "5 minutes"\n')
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert e.value.problems == [f"{config}: sinks[0].partition_interval: '5 minutes': expected e.g. \"1 hour\", "
                                f"\"6 hours\", \"1 day\", \"1 week\""]
    with pytest.raises(ValueError, match="must be 1 or more, got 0"):
        PostgresSinkConfig(dsn="postgresql://x/y", batch_size=0)
    with pytest.raises(ValueError, match="must be 0 or more, got -1"):
        PostgresSinkConfig(dsn="postgresql://x/y", retention_days=-1)
    for ok in ("1 hour", "6 hours", "1 day", "2 days", "1 week"):
        PostgresSink(PostgresSinkConfig(dsn="postgresql://x/y", partition_interval=ok))
    for bad in ("90 minutes", "2 weeks", "day", "1 month"):
        with pytest.raises(ValueError, match=f"{bad!r}"):
            PostgresSinkConfig(dsn="postgresql://x/y", partition_interval=bad)


def test_rows_are_encoded_like_pgwatch() -> None:
    m = measurement("src", 1_700_000_000_123_456_789, tags={"env": "prod"}, rows=[
        {"epoch_ns": 1_700_000_000_123_456_789, "tag_datname": "app", "tag_n": 5, "tag_none": None, "v": 1,
         "nul": "a\x00b"},
        {"tag_datname": "other", "v": 2},  # no epoch_ns: the measurement's
    ])
    request = encode_batch([m, measurement("empty", 1, rows=[])])
    assert request is not None
    (table,) = request.tables
    assert table.table == "db_stats" and table.count == 2
    records = list(table.records)
    assert records == list(table.records)  # iterable again (a repaired flush re-sends them)
    (t1, src1, data1, tags1), (t2, _, data2, tags2) = records
    assert t1 == t2 == dt.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=dt.UTC)
    assert src1 == "src"
    assert data1 == '{"epoch_ns":1700000000123456789,"v":1,"nul":"ab"}'
    assert tags1 == '{"env":"prod","datname":"app","n":"5"}'
    assert data2 == '{"v":2,"epoch_ns":1700000000123456789}'
    assert tags2 == '{"env":"prod","datname":"other"}'
    assert request.listing == {("src", "db_stats")}
    again = encode_batch([m, measurement("empty", 1, rows=[])])
    without_empty = encode_batch([m])
    assert again is not None and without_empty is not None
    assert again.fingerprint == request.fingerprint and without_empty.fingerprint != request.fingerprint
    assert encode_batch([measurement("empty", 1, rows=[])]) is None


async def test_small_batches_wait_for_the_batching_delay(autojump_clock) -> None:
    sink = PostgresSink(PostgresSinkConfig(dsn="postgresql://x/y", batching_delay_seconds=0.95, batch_size=10))
    start = trio.current_time()
    await sink._pace(1)  # nothing flushed yet: at once
    assert trio.current_time() == start
    sink._last_flush = start
    await sink._pace(10)  # a full batch: at once
    assert trio.current_time() == start
    await sink._pace(3)  # a small one waits for the delay after the previous flush
    assert trio.current_time() == pytest.approx(start + 0.95)


# -- schema --------------------------------------------------------------------------------------------


async def test_schema_is_created_and_reinit_is_idempotent(pg15, fresh_db) -> None:
    async with db.open_loop():
        first = await init_storage(pg15.dsn(dbname=fresh_db))
        second = await init_storage(pg15.dsn(dbname=fresh_db), partition_interval_seconds=6 * 3600)
        conn = await open_storage(pg15.dsn(dbname=fresh_db), partition_seconds=86400)
        await conn.close()
    assert first.applied == (1, 2) and first.version == LATEST_VERSION and first.schema_type == "postgres"
    assert second.applied == () and second.version == LATEST_VERSION
    assert conn.schema.applied == ()
    q = lambda sql: one(pg15, sql, fresh_db)  # noqa: E731
    assert q("select schema_type from admin.storage_schema_type") == "postgres"
    assert q("select count(*) from admin.storage_schema_type") == "1"
    assert q("select string_agg(version::text, ',' order by version) from admin.reaper_schema_version") == "1,2"
    assert q("select value from admin.config where key = 'partition_interval'") == "6 hours"
    assert q("select string_agg(attname, ',' order by attnum) from pg_attribute "
             "where attrelid = 'admin.metrics_template'::regclass and attnum > 0") == "time,dbname,data,tag_data"
    assert q("select count(*) from pg_namespace where nspname = 'subpartitions'") == "1"
    assert q("select string_agg(column_name, ',' order by ordinal_position) from information_schema.columns "
             "where table_schema = 'admin' and table_name = 'all_distinct_dbname_metrics'") == \
        "dbname,metric,created_on"
    # the change-tracking and metric tables exist (empty), partitioned by time, with pgwatch's marker comment
    precreated = (*CHANGE_TABLES, *METRIC_TABLES, *DASHBOARD_TABLES)
    assert q("select string_agg(t, ',' order by t) from admin.get_top_level_metric_tables() t") == \
        ",".join(sorted(precreated))
    assert q("select count(*) from pg_partitioned_table p join pg_class c on c.oid = p.partrelid "
             f"where c.relname in ({','.join(repr(t) for t in precreated)}) and p.partstrat = 'r'") == \
        str(len(precreated))
    assert q("select count(*) from pg_indexes "
             "where tablename = 'sproc_changes' and indexdef like '%(dbname, \"time\")%'") == "1"
    assert q("select c.collname from pg_attribute a join pg_collation c on c.oid = a.attcollation "
             "where a.attrelid = 'public.sproc_changes'::regclass and a.attname = 'dbname'") == "C"
    # pgwatch's helper functions, with its argument lists
    signatures = set(q("select p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' "
                       "from pg_proc p where p.pronamespace = 'admin'::regnamespace").splitlines())
    assert signatures >= {
        "ensure_partition_metric_time(metric text, metric_timestamp timestamp with time zone, "
        "partition_period interval, partitions_to_precreate integer, OUT part_available_from timestamp with time "
        "zone, OUT part_available_to timestamp with time zone)",
        "ensure_dummy_metrics_table(metric text)",
        "get_top_level_metric_tables(OUT table_name text)",
        "drop_old_time_partitions(older_than interval, schema_type text)",
        "get_old_time_partitions(older_than interval, schema_type text)",
        "maintain_unique_sources()",
        "truncate_all_metric_tables()",
        "drop_all_metric_tables()",
    }
    assert q("select prokind from pg_proc where proname = 'drop_all_metric_tables'") == "p"


async def test_a_schema_pgwatch_made_is_adopted(pg15, fresh_db) -> None:
    """An existing pgwatch storage (its tables, older routines, a weekly partition) is upgraded in place."""
    pg15.psql("""
        create schema admin; create schema subpartitions;
        create table admin.storage_schema_type (schema_type text not null, initialized_on timestamptz not null
            default now());
        insert into admin.storage_schema_type values ('postgres');
        create table admin.metrics_template (time timestamptz not null default now(), dbname text not null,
            data jsonb not null, tag_data jsonb, check (false));
        create index on admin.metrics_template (dbname, time);
        create table admin.all_distinct_dbname_metrics (dbname text not null, metric text not null,
            created_on timestamptz not null default now(), primary key (dbname, metric));
        create table admin.config (key text primary key, value text not null);
        create function admin.drop_all_metric_tables() returns int language sql as 'select 0';
        create function admin.ensure_partition_metric_time(metric text, metric_timestamp timestamptz,
            partitions_to_precreate int default 0, out part_available_from timestamptz,
            out part_available_to timestamptz) returns record language sql as 'select now(), now()';
        create table public.db_stats (like admin.metrics_template including indexes) partition by range (time);
        comment on table public.db_stats is 'pgwatch-generated-metric-lvl';
        create table subpartitions.db_stats_2024w01 partition of public.db_stats
            for values from ('2024-01-01 00:00+00') to ('2024-01-08 00:00+00');
        insert into public.db_stats values ('2024-01-02 10:00+00', 'old', '{"v": 1}', '{}');
        """, dbname=fresh_db)
    jan3 = int(dt.datetime(2024, 1, 3, 12, tzinfo=dt.UTC).timestamp()) * 10**9
    jan9 = int(dt.datetime(2024, 1, 9, 12, tzinfo=dt.UTC).timestamp()) * 10**9
    sink = await write_all(sink_config(pg15.dsn(dbname=fresh_db), retention_days=0),
                           [measurement("new", jan3), measurement("new", jan9), measurement("new", time.time_ns())])
    assert sink.rows == 3
    q = lambda sql: one(pg15, sql, fresh_db)  # noqa: E731
    assert q("select count(*) from admin.storage_schema_type") == "1"
    assert q("select count(*) from pg_proc where proname = 'ensure_partition_metric_time'") == "1"
    assert q("select prokind from pg_proc where proname = 'drop_all_metric_tables'") == "p"
    assert q("select count(*) from subpartitions.db_stats_2024w01") == "2"  # the old week took the new row
    parts = partitions(pg15, fresh_db, "db_stats")
    assert parts["db_stats_20240109"] == ("2024-01-09 00:00:00", "2024-01-10 00:00:00")
    assert q("select count(*) from sproc_changes") == "0"
    # another width later: the aligned week of Jan 14 overlaps the days made above, so it is clipped to the gap
    jan14 = int(dt.datetime(2024, 1, 14, 12, tzinfo=dt.UTC).timestamp()) * 10**9
    await write_all(sink_config(pg15.dsn(dbname=fresh_db), partition_interval="1 week", retention_days=0),
                    [measurement("new", jan14)])
    parts = partitions(pg15, fresh_db, "db_stats")
    assert parts["db_stats_20240113"] == ("2024-01-13 00:00:00", "2024-01-15 00:00:00")
    assert parts["db_stats_20240115"] == ("2024-01-15 00:00:00", "2024-01-22 00:00:00")


def test_storage_init_command(pg15, fresh_db) -> None:
    def reaper(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reaper.cli", "storage", "init", *args], capture_output=True,
                              text=True, timeout=60)

    dsn = pg15.dsn(dbname=fresh_db, password="not-shown")
    first = reaper("--dsn", dsn, "--partition-interval", "1 week")
    again = reaper("--dsn", dsn)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "applied migrations 1, 2" in first.stdout and "already at version 2" in again.stdout
    assert "not-shown" not in first.stdout + first.stderr + again.stdout + again.stderr
    assert one(pg15, "select value from admin.config where key = 'partition_interval'", fresh_db) == "168 hours"
    bad = reaper("--dsn", dsn, "--partition-interval", "90 minutes")
    assert bad.returncode == 1 and "--partition-interval" in bad.stderr
    down = reaper("--dsn", "postgresql://u:hidden-pw@127.0.0.1:9/x")
    # a password inline is warned about (ps shows it); the failure itself is one line, and neither shows it
    warning, failure = down.stderr.strip().splitlines()
    assert down.returncode == 1 and "ps" in warning and "127.0.0.1:9" in failure and "hidden-pw" not in down.stderr


async def test_pgwatch_helpers_run(pg15, fresh_db) -> None:
    now = time.time_ns()
    await write_all(sink_config(pg15.dsn(dbname=fresh_db), maintenance_interval_seconds=0),
                    [measurement("a", now), measurement("b", now, metric="wal")])
    q = lambda sql: one(pg15, sql, fresh_db)  # noqa: E731
    assert q("select admin.ensure_dummy_metrics_table('new_metric')") == "t"
    assert q("select admin.ensure_dummy_metrics_table('new_metric')") == "f"
    assert q("select count(*) from admin.get_old_time_partitions('1 day')") == "0"
    assert q("delete from admin.all_distinct_dbname_metrics where dbname = 'a'; "
             "insert into admin.all_distinct_dbname_metrics (dbname, metric) values ('gone', 'db_stats'); "
             "select admin.maintain_unique_sources()") == "2"
    assert q("select string_agg(dbname || ':' || metric, ',' order by dbname) from admin.all_distinct_dbname_metrics") \
        == "a:db_stats,b:wal"
    tables = len(CHANGE_TABLES) + len(METRIC_TABLES) + len(DASHBOARD_TABLES)
    assert q("select admin.truncate_all_metric_tables()") == str(tables + 1)
    assert q("select count(*) from db_stats") == "0"
    pg15.psql("call admin.drop_all_metric_tables()", dbname=fresh_db)
    assert q("select count(*) from admin.get_top_level_metric_tables()") == "0"
    assert q("select count(*) from pg_class where relnamespace = 'subpartitions'::regnamespace") == "0"


# -- writing -------------------------------------------------------------------------------------------


async def test_rows_read_back_with_a_dashboard_query(pg15, fresh_db, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    now = time.time_ns()
    batches = [[measurement(src, now - k * 10**9, tags={"env": "prod"}) for src in ("alpha", "beta")]
               for k in range(5)]
    password = "pw-" + uuid.uuid4().hex
    sink = await write_all(sink_config(pg15.dsn(dbname=fresh_db, password=password)), *batches)
    assert sink.written == 10 and sink.rows == 10 and sink.flushes == 5
    # shaped like a Grafana panel: $__timeFilter(time), a dbname variable, values from data, tags from tag_data
    got = rows_of(pg15, f"""
        select floor(extract(epoch from time))::int8, dbname, (data->>'xact_commit')::int8, tag_data->>'datname',
               tag_data->>'env', (data->>'epoch_ns')::int8
        from db_stats
        where time between '{utc(now - 60 * 10**9).isoformat()}' and '{utc(now + 10**9).isoformat()}'
          and dbname in ('alpha')
        order by time""", fresh_db)
    assert len(got) == 5
    for k, (epoch, dbname, commits, datname, env, epoch_ns) in enumerate(reversed(got)):
        ns = now - k * 10**9
        assert int(epoch) == ns // 10**9 and int(epoch_ns) == ns
        assert (dbname, int(commits), datname, env) == ("alpha", ns % 1000, "alpha", "prod")
    # the Grafana drop-down
    assert one(pg15, "select string_agg(dbname, ',' order by dbname) from admin.all_distinct_dbname_metrics "
                     "where metric = 'db_stats'", fresh_db) == "alpha,beta"
    assert not any(password in r.getMessage() for r in caplog.records)
    assert any("connected to" in r.getMessage() and "***" in r.getMessage() for r in caplog.records)


async def test_decimal_nan_and_datetime_values(pg15, fresh_db) -> None:
    now = time.time_ns()
    stamp = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    row = {"epoch_ns": now, "dec": decimal.Decimal("1.50"), "dec_int": decimal.Decimal("42"),
           "dec_nan": decimal.Decimal("NaN"), "nan": math.nan, "inf": -math.inf, "ts": stamp,
           "age": dt.timedelta(minutes=2, microseconds=500000), "none": None, "flag": True, "text": "x\x00y",
           "big": 2**63 - 1}
    await write_all(sink_config(pg15.dsn(dbname=fresh_db)), [measurement("s", now, metric="types", rows=[row])])
    got = rows_of(pg15, """select data->>'dec', data->>'dec_int', jsonb_typeof(data->'dec_nan'),
                                  jsonb_typeof(data->'nan'), jsonb_typeof(data->'inf'), data->>'ts',
                                  data->>'age', jsonb_typeof(data->'none'), data->>'flag', data->>'text',
                                  data->>'big', jsonb_typeof(data->'dec') from types""", fresh_db)
    # null values (SQL NULL, NaN, infinities) are left out of data: no JSON null for a jsonb cast to refuse
    assert got == [["1.50", "42", "", "", "", "2024-05-06T07:08:09.123456+00:00", "120.5", "",
                    "true", "xy", str(2**63 - 1), "number"]]
    assert rows_of(pg15, """select data ? 'none', data ? 'nan', data ? 'inf', data ? 'dec_nan',
                                   (data->'none')::int8 is null, (data->'nan')::float8 is null from types""",
                   fresh_db) == [["f", "f", "f", "f", "t", "t"]]


async def test_storage_name_is_the_table(pg15, fresh_db) -> None:
    now = time.time_ns()
    await write_all(sink_config(pg15.dsn(dbname=fresh_db)),
                    [measurement("s", now, metric="stat_statements_calls", table="stat_statements")])
    assert one(pg15, "select count(*) from stat_statements", fresh_db) == "1"
    assert one(pg15, "select count(*) from stat_statements_calls", fresh_db) == "0"  # created empty up front
    assert one(pg15, "select metric from admin.all_distinct_dbname_metrics", fresh_db) == "stat_statements"


async def test_partitions_for_past_and_future_times_and_precreated_ones(pg15, fresh_db) -> None:
    now = time.time_ns()
    times = [now - 3 * DAY_NS, now, now + 10 * DAY_NS]
    sink = await write_all(sink_config(pg15.dsn(dbname=fresh_db)), *([measurement("s", t)] for t in times))
    assert sink.rows == 3
    parts = partitions(pg15, fresh_db, "db_stats")
    for t in times:  # each row time's day plus the 3 days after it
        for k in range(4):
            start = utc(partition_start_ns(t, 86400) + k * DAY_NS)
            name = f"db_stats_{start:%Y%m%d}"
            assert parts[name] == (f"{start:%Y-%m-%d} 00:00:00", f"{start + dt.timedelta(days=1):%Y-%m-%d} 00:00:00")
    assert len(parts) == 11  # the windows of the first two rows overlap
    assert one(pg15, "select count(distinct obj_description(oid, 'pg_class')) || obj_description(min(oid), "
                     "'pg_class') from pg_class where relnamespace = 'subpartitions'::regnamespace "
                     "and relkind = 'r'", fresh_db) == "1pgwatch-generated-metric-time-lvl"
    # hourly partitions are named _YYYYMMDD_HH24 and aligned to the hour
    await write_all(sink_config(pg15.dsn(dbname=fresh_db), partition_interval="1 hour"),
                    [measurement("s", now, metric="hourly")])
    hourly = partitions(pg15, fresh_db, "hourly")
    start = utc(partition_start_ns(now, 3600))
    assert sorted(hourly) == [f"hourly_{start + dt.timedelta(hours=k):%Y%m%d_%H}" for k in range(4)]
    # a week starts on Monday
    await write_all(sink_config(pg15.dsn(dbname=fresh_db), partition_interval="1 week"),
                    [measurement("s", now, metric="weekly")])
    first = min(partitions(pg15, fresh_db, "weekly").values())
    assert dt.datetime.fromisoformat(first[0]).weekday() == 0


async def test_a_dropped_partition_is_recreated_and_the_flush_retried(pg15, fresh_db, caplog) -> None:
    now = time.time_ns()
    config = sink_config(pg15.dsn(dbname=fresh_db), maintenance_interval_seconds=0)
    sink = PostgresSink(config)
    async with db.open_loop():
        await sink.open()
        await sink.write([measurement("s", now)])
        day = utc(partition_start_ns(now, 86400))
        await trio.to_thread.run_sync(pg15.psql, f"drop table subpartitions.db_stats_{day:%Y%m%d}", fresh_db)
        await sink.write([measurement("s", now + 1000)])  # the cache still believes in the partition
        await sink.aclose()
    assert one(pg15, "select count(*) from db_stats", fresh_db) == "1"  # the first row went with its partition
    assert any("re-creating partitions" in r.getMessage() for r in caplog.records)


async def test_a_large_batch_is_one_transaction_and_other_tasks_keep_running(pg15, fresh_db) -> None:
    now = time.time_ns()
    big = [measurement(f"s{k}", now + k, metric=metric, rows=[
        {"epoch_ns": now + k, "tag_i": i, "v": i, "w": decimal.Decimal(i) / 7} for i in range(1500)])
        for k in range(2) for metric in ("big_a", "big_b")]
    ticks = 0
    sink = PostgresSink(sink_config(pg15.dsn(dbname=fresh_db)))
    async with db.open_loop():
        await sink.open()

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            before = ticks
            await sink.write(big)
            during = ticks - before
            nursery.cancel_scope.cancel()
        await sink.aclose()
    assert one(pg15, "select count(*) from big_a", fresh_db) == one(pg15, "select count(*) from big_b", fresh_db) \
        == "3000"
    assert one(pg15, "select count(distinct xmin::text) from "
                     "(select xmin from big_a union all select xmin from big_b) x", fresh_db) == "1"  # one transaction
    assert during > 4  # the event loop had turns while 6000 rows were encoded and sent


async def test_tables_made_elsewhere(pg15, fresh_db) -> None:
    """A plain table (made by hand) is written as it is; pgwatch's old LIST layout is refused clearly."""
    async with db.open_loop():
        await init_storage(pg15.dsn(dbname=fresh_db))
    pg15.psql("create table public.plain (like admin.metrics_template including defaults);"
              "create table public.legacy (like admin.metrics_template including defaults) partition by list (dbname)",
              dbname=fresh_db)
    now = time.time_ns()
    await write_all(sink_config(pg15.dsn(dbname=fresh_db)), [measurement("s", now, metric="plain")])
    assert one(pg15, "select count(*) from plain", fresh_db) == "1"
    sink = PostgresSink(sink_config(pg15.dsn(dbname=fresh_db)))
    async with db.open_loop():
        await sink.open()
        with pytest.raises(StorageError, match="not partitioned by range"):
            await sink.write([measurement("s", now, metric="legacy")])
        await sink.aclose()


async def test_a_batch_sent_again_is_not_stored_twice(pg15, fresh_db) -> None:
    now = time.time_ns()
    batch = [measurement("s", now), measurement("t", now)]
    sink = await write_all(sink_config(pg15.dsn(dbname=fresh_db)), batch, list(batch))
    assert sink.duplicates == 1
    assert one(pg15, "select count(*) from db_stats", fresh_db) == "2"


async def test_retention_drops_old_partitions(pg15, fresh_db) -> None:
    now = time.time_ns()
    config = sink_config(pg15.dsn(dbname=fresh_db), retention_days=14, maintenance_interval_seconds=0)
    old, recent = now - 30 * DAY_NS, now - 2 * DAY_NS
    sink = PostgresSink(config)
    async with db.open_loop():
        await sink.open()
        await sink.write([measurement("old", old), measurement("recent", recent), measurement("now", now)])
        before = partitions(pg15, fresh_db, "db_stats")
        result = await sink.run_maintenance()
        after = partitions(pg15, fresh_db, "db_stats")
        await sink.write([measurement("old", old + 1000)])  # its partition is gone: created again
        await sink.aclose()
    old_day = utc(partition_start_ns(old, 86400))
    assert f"db_stats_{old_day:%Y%m%d}" in before and f"db_stats_{old_day:%Y%m%d}" not in after
    assert result.dropped_partitions == 4  # the old day and its 3 pre-created successors, all > 14 days old
    assert all(hi >= f"{utc(now - 14 * DAY_NS):%Y-%m-%d}" for _, hi in after.values())
    assert rows_of(pg15, "select dbname from db_stats order by time", fresh_db) == [["old"], ["recent"], ["now"]]
    assert result.listing_changes == 1  # ("old", "db_stats") left the listing with its rows (and came back)
    assert one(pg15, "select count(*) from admin.all_distinct_dbname_metrics", fresh_db) == "3"
    assert sink.last_maintenance is result


# a dashboard's long query: reads db_stats in a transaction that stays open until the process is killed
READER = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.execute("begin; select count(*) from db_stats")
    print("reading", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


async def test_retention_never_makes_a_long_reader_queue_everyone_behind_it(pg15, fresh_db) -> None:
    """Dropping an old partition locks its metric table ACCESS EXCLUSIVE. Behind a dashboard's long query that
    DROP waited for the whole write timeout, and every reader and writer of the table queued behind it (a
    dashboard query on db_stats hung 10 s and more). A partition whose table is busy is now left for the next
    maintenance after a lock wait of DROP_LOCK_TIMEOUT, the others are dropped, and nothing waits longer."""
    now = time.time_ns()
    config = sink_config(pg15.dsn(dbname=fresh_db), retention_days=14, maintenance_interval_seconds=0,
                         write_timeout_seconds=10)
    sink = PostgresSink(config)
    async with db.open_loop():
        await sink.open()
        await sink.write([measurement("old", now - 30 * DAY_NS), measurement("old", now - 30 * DAY_NS, table="wal"),
                          measurement("now", now)])
        reader = subprocess.Popen(  # noqa: ASYNC220 (a helper process; Popen returns at once)
            [sys.executable, "-c", READER, pg15.dsn(dbname=fresh_db)], stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
            busy = await sink.run_maintenance()
            stats_kept = partitions(pg15, fresh_db, "db_stats")
            wal_kept = partitions(pg15, fresh_db, "wal")
        finally:
            reader.kill()
            reader.communicate()  # (closes its stdout)
        free = await sink.run_maintenance()
        await sink.aclose()
    assert (busy.dropped_partitions, busy.kept_locked) == (4, 4)  # wal's 4 old days went; db_stats' stay for now
    old_day = f"{utc(partition_start_ns(now - 30 * DAY_NS, 86400)):%Y%m%d}"
    assert f"db_stats_{old_day}" in stats_kept and f"wal_{old_day}" not in wal_kept
    assert (free.dropped_partitions, free.kept_locked) == (4, 0)
    assert f"db_stats_{old_day}" not in partitions(pg15, fresh_db, "db_stats")


async def test_a_new_partition_behind_a_long_reader_is_an_outage_retried_not_a_queue(pg15, fresh_db) -> None:
    """Creating a partition locks its table ACCESS EXCLUSIVE too: behind a dashboard's long query the write
    waited for the whole write timeout with every other reader queued behind it. It now gives up after
    DROP_LOCK_TIMEOUT as an outage (the sink spills and retries), and succeeds once the reader is done."""
    now = time.time_ns()
    sink = PostgresSink(sink_config(pg15.dsn(dbname=fresh_db), write_timeout_seconds=10,
                                    maintenance_interval_seconds=0))
    async with db.open_loop():
        await sink.open()
        await sink.write([measurement("now", now)])  # today's partition and the next few exist
        reader = subprocess.Popen(  # noqa: ASYNC220 (a helper process; Popen returns at once)
            [sys.executable, "-c", READER, pg15.dsn(dbname=fresh_db)], stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
            with pytest.raises(StorageError, match="lock timeout") as e:
                await sink.write([measurement("later", now + 10 * DAY_NS)])  # a day no partition covers yet
        finally:
            reader.kill()
            reader.communicate()
        await sink.write([measurement("later", now + 10 * DAY_NS)])
        await sink.aclose()
    assert isinstance(e.value, OSError)  # an outage: the sink's task spills and retries it
    assert rows_of(pg15, "select dbname from db_stats order by time", fresh_db) == [["now"], ["later"]]


async def test_retention_zero_keeps_everything(pg15, fresh_db) -> None:
    now = time.time_ns()
    sink = await write_all(sink_config(pg15.dsn(dbname=fresh_db), retention_days=0),
                           [measurement("old", now - 400 * DAY_NS), measurement("now", now)])
    assert sink.last_maintenance is not None and sink.last_maintenance.dropped_partitions == 0
    assert one(pg15, "select count(*) from db_stats", fresh_db) == "2"


# -- outages -------------------------------------------------------------------------------------------


async def test_storage_down_at_start_then_writes_raise_an_oserror(caplog) -> None:
    sink = PostgresSink(sink_config("postgresql://u:secret-pw@127.0.0.1:9/none", connect_timeout_seconds=2))
    async with db.open_loop():
        await sink.open()  # logs, does not raise: collection must start anyway
        with pytest.raises(OSError) as e:
            await sink.write([measurement("s", time.time_ns())])
        await sink.aclose()
    assert isinstance(e.value, StorageError) and e.value.connection_lost
    assert any("cannot be used at start" in r.getMessage() for r in caplog.records)
    assert not any("secret-pw" in r.getMessage() for r in caplog.records)


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    with PgServer.create(major=15) as server:
        yield server


async def test_storage_stopped_mid_run_loses_and_duplicates_nothing(own_server: PgServer, caplog) -> None:
    from reaper.sinks import run_sink

    server = own_server
    config = sink_config(server.dsn(password="s3cret-sink-pw"), batching_delay_seconds=0.05,
                         connect_timeout_seconds=3, write_timeout_seconds=5)
    sink = PostgresSink(config)
    sent: list[Measurement] = []
    base = time.time_ns()
    async with db.open_loop():
        # direct: a write while the server is down raises; the same batch succeeds after it is back
        await sink.open()
        await sink.write([measurement("direct", base)])
        await trio.to_thread.run_sync(server.stop)
        with pytest.raises(OSError):
            await sink.write([measurement("direct", base + 1)])
        await trio.to_thread.run_sync(server.start)
        await sink.write([measurement("direct", base + 1)])
        # through the sink task (the caller's retries): a stream of measurements with the server stopped midway
        send, receive = trio.open_memory_channel[Measurement](100_000)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_sink, sink, receive)
            async with send:
                for k in range(60):
                    m = measurement(f"src{k % 3}", base + (k + 10) * 10**6)
                    sent.append(m)
                    send.send_nowait(m)
                    if k == 20:
                        await trio.to_thread.run_sync(server.stop)
                    if k == 40:
                        await trio.sleep(1.0)
                        await trio.to_thread.run_sync(server.start)
                    await trio.sleep(0.02)
    got = rows_of(server, "select dbname, (data->>'epoch_ns')::int8 from db_stats where dbname <> 'direct'",
                  "postgres")
    assert sorted((d, int(e)) for d, e in got) == sorted((m.source, m.epoch_ns) for m in sent)  # all, once each
    assert one(server, "select count(*) from db_stats where dbname = 'direct'", "postgres") == "2"
    messages = [r.getMessage() for r in caplog.records]
    assert any("retrying every" in m for m in messages)  # the outage was said (once), not hidden
    assert not any("s3cret-sink-pw" in m for m in messages)


async def test_an_abandoned_asyncpg_future_of_a_lost_connection_does_not_stop_the_loop(pg15, fresh_db) -> None:
    """asyncpg's copy_in leaves a future behind when a shutdown message races it (see storage.py)."""
    import asyncpg
    import trio_asyncio

    async with db.open_loop():
        conn = await open_storage(pg15.dsn(dbname=fresh_db), partition_seconds=86400)
        loop = trio_asyncio.current_loop.get()
        loop.call_exception_handler({"message": "Future exception was never retrieved",
                                     "exception": asyncpg.ConnectionDoesNotExistError("gone")})
        await trio.sleep(0.05)  # trio-asyncio would raise it in the loop's nursery by now
        await conn.close()


async def test_unanswered_commit_is_settled_without_duplicates(pg15, fresh_db) -> None:
    """A connection lost around COMMIT: the sink looks the flush up before writing again."""
    now = time.time_ns()
    sink = PostgresSink(sink_config(pg15.dsn(dbname=fresh_db), maintenance_interval_seconds=0))
    first = [measurement("a", now), measurement("b", now)]
    async with db.open_loop():
        await sink.open()
        await sink.write(first)
        # as if that COMMIT's answer had been lost: the caller retries the measurements, regrouped
        request = encode_batch(first)
        assert request is not None
        sink._unsettled = (request.fingerprint, [measurement_key(m) for m in first])
        await sink.write([first[1], measurement("c", now)])
        await sink.aclose()
    assert rows_of(pg15, "select dbname from db_stats order by dbname", fresh_db) == [["a"], ["b"], ["c"]]
    assert measurement_key(first[1]) not in sink._stored  # forgotten once skipped


# -- the daemon ----------------------------------------------------------------------------------------


@pytest.fixture
def storage_db(pg15) -> Iterator[str]:
    name = f"t_storage_{uuid.uuid4().hex[:8]}"
    pg15.psql(f"create database {name}")
    yield name
    pg15.psql(f"drop database if exists {name} with (force)")


async def test_daemon_writes_db_stats_to_postgres_storage(pg15, fresh_db, monitor_role, storage_db,
                                                          tmp_path: Path) -> None:
    from reaper.daemon.app import Daemon

    role, password = monitor_role
    config = Config(
        sources=(SourceConfig(name="main", dsn=pg15.dsn(user=role, dbname=fresh_db, password=password),
                              metrics={"db_stats": 1}, tags={"env": "test"}),),
        sinks=(PostgresSinkConfig(dsn=pg15.dsn(dbname=storage_db), batching_delay_seconds=0.2),),
        collector=CollectorConfig(state_dir=str(tmp_path / "state"), shutdown_grace_seconds=5),
    )
    count = "select count(*) from db_stats where dbname = 'main'"
    async with db.open_loop():
        daemon = Daemon(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            with trio.fail_after(30):
                while True:
                    exists = await trio.to_thread.run_sync(
                        one, pg15, "select to_regclass('public.db_stats') is not null", storage_db)
                    if exists == "t" and int(await trio.to_thread.run_sync(one, pg15, count, storage_db)) >= 2:
                        break
                    await trio.sleep(0.2)
            daemon.request_stop()
    got = rows_of(pg15, """
        select (data->>'numbackends')::int >= 0, tag_data->>'env', data ? 'epoch_ns', data ? 'xact_commit'
        from db_stats where dbname = 'main' and time > now() - interval '5 minutes'""", storage_db)
    assert len(got) >= 2 and all(r == ["t", "test", "t", "t"] for r in got)
    # the TPS panel of pgwatch's database overview, its Grafana macros expanded
    tps = rows_of(pg15, """
        select to_timestamp(floor(extract(epoch from time) / 60) * 60) as time,
               avg(((c - c_lag) + (r - r_lag)) / extract(epoch from time - time_lag)) as tps
        from (select (data->>'xact_commit')::int8 as c, lag((data->>'xact_commit')::int8) over w as c_lag,
                     (data->>'xact_rollback')::int8 as r, lag((data->>'xact_rollback')::int8) over w as r_lag,
                     time, lag(time) over w as time_lag
              from db_stats
              where dbname = 'main' and time between now() - interval '6 hours' and now()
              window w as (order by time)) x
        where c >= c_lag and r >= r_lag and time > time_lag
        group by 1 order by 1""", storage_db)
    assert tps and all(float(value) >= 0 for _, value in tps)
    assert one(pg15, "select metric from admin.all_distinct_dbname_metrics where dbname = 'main'",
               storage_db) == "db_stats"


async def test_nul_characters_are_removed_counted_and_said_once(pg15, fresh_db, caplog) -> None:
    """PostgreSQL's text and jsonb cannot hold NUL: a value or source name with one must not stop the storage
    (issue 12 item 3); the characters are dropped, counted, and said once."""
    from reaper.sinks import postgres as pg_sink

    now = time.time_ns()
    before = pg_sink.nul_removed[0]
    rows = [{"epoch_ns": now, "query": "a\x00b\x00c"}]
    batches = [[measurement("nul\x00source", now + k, metric="nul_values", rows=[dict(r, epoch_ns=now + k)
                                                                               for r in rows])] for k in range(3)]
    with caplog.at_level(logging.WARNING, logger="reaper.sinks.postgres"):
        await write_all(sink_config(pg15.dsn(dbname=fresh_db)), *batches)
    got = rows_of(pg15, "select dbname, data->>'query' from nul_values", fresh_db)
    assert got == [["nulsource", "abc"]] * 3
    assert pg_sink.nul_removed[0] - before == 3 * 3  # two in each value, one in each source name
    said = [r for r in caplog.records if "NUL" in r.getMessage()]
    assert len(said) == 1
