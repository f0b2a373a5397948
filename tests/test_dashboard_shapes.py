"""pgwatch's Grafana dashboards (v12, PostgreSQL sink) run on reaper's storage without an SQL error.

No pgwatch file is read here. After a short real `reaper run` with the `exhaustive` preset into a
postgres sink, queries written in the dashboards' style run on the storage: a time filter, the source's
`dbname`, `(data->>'col')::int8` and the jsonb form `(data->'col')::int8` (which refuses a JSON null: null values are
left out of `data`), counters turned into rates with
`lag() over (partition by dbname[, tag] order by time)`, grouping by time buckets, `tag_data->>'x'` filters
and groupings, and the admin objects the dashboards' variables and upkeep use. `READS` lists, as facts, the
metric columns and casts those dashboards read (metric, columns, cast); every metric table they read
exists (created empty up front when the metric has no rows yet, or is not in the preset at all, or is a
metric reaper does not have: DASHBOARD_TABLES).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from pgserver import ServerHandle, create_extensions, quote_ident

from reaper.catalog.metrics import load_shipped_definitions
from reaper.db.storage_schema import CHANGE_TABLES, DASHBOARD_TABLES, METRIC_TABLES

pytestmark = pytest.mark.pg

REAPER = [sys.executable, "-m", "reaper.cli"]
SOURCE = "exhaustive"
RUN_LIMIT_SECONDS = 45

#: (metric table, value columns, cast) the v12 dashboards read, e.g. health check, global and DB
#: overview, query performance, tables overview, table details, index overview, sessions overview,
#: checkpointer/bgwriter, replication, change events, settings overview, system stats, recommendations
READS: list[tuple[str, str, str]] = [
    ("db_stats", "xact_commit xact_rollback blks_hit blks_read temp_bytes tup_inserted tup_updated tup_deleted "
                 "tup_fetched tup_returned numbackends sessions deadlocks backup_duration_s", "int8"),
    ("db_stats", "in_recovery_int postmaster_uptime_s numbackends", "int"),
    ("wal", "xlog_location_b", "int8"),
    ("wal", "in_recovery_int postmaster_uptime_s", "int"),
    ("wal_size", "wal_size_b", "float8"),
    ("db_size", "size_b", "int8"),
    ("backends", "total active idle idleintransaction waiting longest_query_seconds", "int"),
    ("backends", "longest_autovacuum_seconds longest_tx_seconds max_xmin_age_tx longest_waiting_seconds "
                 "longest_session_seconds longest_query_seconds instance_total max_connections av_workers", "int8"),
    ("backends", "avg_query_seconds avg_waiting_seconds avg_tx_seconds avg_session_seconds", "float"),
    ("db_stats", "blk_read_time blk_write_time", "float8"),
    ("stat_statements_calls", "calls", "int8"),
    ("stat_statements_calls", "total_time", "float8"),
    ("stat_statements", "calls rows shared_blks_hit shared_blks_read shared_blks_written temp_blks_read "
                        "temp_blks_written", "int8"),
    ("stat_statements", "total_time total_plan_time blk_read_time blk_write_time", "numeric"),
    ("table_stats", "seq_scan table_size_b total_relation_size_b tx_freeze_age n_tup_ins n_tup_upd n_tup_del "
                    "seconds_since_last_vacuum seconds_since_last_analyze toast_size_b", "int8"),
    ("table_stats", "no_autovacuum", "int"),
    ("table_io_stats", "heap_blks_read heap_blks_hit idx_blks_read idx_blks_hit", "int8"),
    ("table_io_stats", "heap_blks_read idx_blks_read toast_blks_read toast_blks_hit tidx_blks_read tidx_blks_hit",
     "float8"),
    ("index_stats", "idx_scan index_size_b idx_blks_read idx_blks_hit idx_tup_read idx_tup_fetch", "int8"),
    ("index_stats", "is_invalid_int", "int"),
    ("sproc_stats", "sp_calls", "int8"),
    ("sproc_stats", "total_time self_time", "float8"),
    ("bgwriter", "checkpoints_req checkpoints_timed buffers_checkpoint buffers_clean buffers_backend", "int8"),
    ("bgwriter", "checkpoint_write_time checkpoint_sync_time", "float8"),
    ("checkpointer", "num_timed num_requested buffers_written", "int8"),
    ("checkpointer", "write_time sync_time", "float8"),
    ("table_bloat_approx_summary_sql", "approx_table_bloat_b", "int8"),
    ("cpu_load", "load_1min load_5min load_15min", "float8"),
    ("locks_mode", "count", "int"),
    ("locks_mode", "count", "int8"),
    ("settings_num", "value", "float8"),
    ("datfrozenxid", "datfrozenxid_age", "int8"),
    ("archiver", "is_failing_int", "int"),
    ("archiver_pending_count", "pending_count", "int8"),
    ("replication", "replay_lag_b write_lag_b flush_lag_b", "int8"),
    ("replication", "is_sync_int", "int"),
    ("replication_slots", "non_active_int", "int"),
    ("replication_slots", "xmin_age_tx restart_lsn_lag_b", "int8"),
    ("settings", "server_version_num", "int8"),
    ("settings", "max_connections autovacuum_max_workers", "int"),
    ("settings", "block_size", "int8"),
    ("server_log_event_counts", "error fatal error_total fatal_total", "int8"),
    ("recommendations", "index_size_b", "int8"),
    ("recommendations", "total_avg_exec_time", "float8"),
    ("psutil_disk", "free total", "int8"),
    ("psutil_cpu", "cpu_utilization load_1m_norm load_1m idle user system iowait", "float8"),
    ("psutil_mem", "total available", "int8"),
    ("psutil_mem", "used free buff_cache swap_used swap_total", "float8"),
    ("psutil_disk", "percent free", "float8"),
    ("psutil_disk_io_total", "read_bytes write_bytes", "int8"),
    # stat statements top (fast, visual), single query details, SQL search
    ("stat_statements", "shared_blks_dirtied", "int8"),
    ("stat_statements", "total_time blk_read_time blk_write_time", "float8"),
    # tables top, table details (and time lag), biggest relations, sproc details, global health, version overview
    ("table_stats", "idx_scan", "int8"),
    ("table_io_stats", "toast_blks_read tidx_blks_read", "int8"),
    ("sproc_stats", "total_time self_time", "float"),
    ("settings", "server_version_num", "int"),
    ("backends", "longest_tx_seconds waiting max_connections instance_total", "int"),
    ("wal_size", "wal_size_b", "int8"),
    ("psutil_cpu", "cpu_utilization", "numeric"),
    ("pgpool_stats", "select_cnt", "int8"),
    ("stat_statements_jit", "total_jit_time total_time", "float8"),
    # DB overview (developer, time lag), system stats time lag
    ("backends", "active idleintransaction", "int8"),
    ("psutil_cpu", "iowait", "float8"),
    ("psutil_mem", "percent available swap_percent", "float8"),
]

#: (metric table, number columns, cast) read only in the jsonb form `(data->'col')::cast`, where a number with a
#: fraction is rounded (single query details: `(data->'total_time')::int8`); the text form would refuse "7.41"
JSONB_READS: list[tuple[str, str, str]] = [
    ("stat_statements", "total_time blk_read_time blk_write_time", "int8"),
]

#: (metric table, tag) the dashboards filter, partition or group by
TAGS: list[tuple[str, str]] = [
    ("stat_statements", "queryid"), ("stat_statements", "query"), ("table_stats", "table_full_name"),
    ("index_stats", "table_full_name"), ("index_stats", "index_full_name"), ("sproc_stats", "function_full_name"),
    ("table_io_stats", "table_full_name"), ("locks_mode", "lockmode"), ("psutil_disk", "dir_or_tablespace"),
    ("settings_num", "name"), ("sproc_stats", "oid"), ("index_stats", "index_name"),
    ("replication_slots", "slot_name"), ("recommendations", "reco_topic"), ("recommendations", "issue_type"),
    ("recommendations", "object_name"), ("table_changes", "table"), ("index_changes", "index"),
    ("sproc_changes", "sproc"), ("configuration_changes", "setting"), ("psutil_disk", "path"),
    ("table_stats", "schema"), ("table_io_stats", "table_full_name"), ("pgpool_stats", "node_id"),
]

#: tables that must hold rows after the first ticks (else the casts above prove nothing)
MUST_HAVE_ROWS = ("db_stats", "wal", "db_size", "backends", "stat_statements_calls", "stat_statements",
                  "table_stats", "index_stats", "sproc_stats", "bgwriter", "settings_num", "cpu_load")


def rate_query(table: str, column: str, cast: str, arrow: str) -> str:
    """A counter as a per-second rate per bucket, the dashboards' lag() shape."""
    value = f"(data{arrow}'{column}')::{cast}"
    return f"""
select floor(extract(epoch from time)/60)*60 as time, dbname,
       avg((v - v_lag) / nullif(extract(epoch from time - time_lag), 0)) as rate
from (select {value} as v, lag({value}) over w as v_lag, time, lag(time) over w as time_lag, dbname
      from public.{quote_ident(table)}
      where dbname in ('{SOURCE}') and time between now() - interval '1 hour' and now()
      window w as (partition by dbname, tag_data order by time)) x
where v >= v_lag and time > time_lag
group by 1, 2 order by 1"""


def last_value_query(table: str, column: str, cast: str, arrow: str) -> str:
    """The last value of a column, the stat panels' shape."""
    return f"""
select time, (data{arrow}'{column}')::{cast} from public.{quote_ident(table)}
where time > now() - '1h'::interval and dbname = '{SOURCE}' order by time desc limit 1"""


def aggregate_query(table: str, column: str, cast: str) -> str:
    """max - min and a sum over the latest sample, the table panels' shape."""
    value = f"(data->>'{column}')::{cast}"
    return f"""
select max({value}) - min({value}), sum({value}) filter (where time = (select max(time) from
       public.{quote_ident(table)} where dbname = '{SOURCE}'))
from public.{quote_ident(table)} where dbname = '{SOURCE}' and time between now() - interval '1 hour' and now()"""


def tag_query(table: str, tag: str) -> str:
    return f"""
select tag_data->>'{tag}' as tag, count(*), max(time) from public.{quote_ident(table)}
where dbname = '{SOURCE}' and tag_data->>'{tag}' ~* '.*' and time > now() - '1h'::interval
group by 1 order by 2 desc limit 20"""


ADMIN_QUERIES = [
    "select distinct dbname from admin.all_distinct_dbname_metrics order by 1",
    "select distinct dbname from admin.all_distinct_dbname_metrics where metric = 'stat_statements' order by 1",
    # the global overview's "primaries only" variable
    "select distinct dbname from admin.all_distinct_dbname_metrics a where (select (data->'in_recovery_int')::int"
    " from db_stats where dbname = a.dbname and time > now() - '1h'::interval order by time desc limit 1) = 0",
    "select * from admin.get_top_level_metric_tables()",
    "select admin.maintain_unique_sources()",
    "select count(*) from public.configuration_changes where dbname = 'exhaustive'",
    # the settings overview's variable, the change events' settings table
    "select distinct tag_data->>'name' from settings_num where dbname = 'exhaustive'"
    " and time > now() - '24h'::interval",
    "select key, value::text from jsonb_each((select data from db_stats order by time desc limit 1))",
    *[f"select count(*) from public.{t} where time > now() - '1h'::interval" for t in DASHBOARD_TABLES],
    # the global health's hidden variable: the pooler table's name when it exists
    "select coalesce(to_regclass('pgbouncer_stats')::text, 'db_stats')",
]

#: panels that read text columns or join metric tables (global health, tables top, stat statements top,
#: version overview), in the dashboards' shape
PANEL_QUERIES = [
    # sources configured lately without fresh db_stats rows, with their last role, age and uptime
    f"""select c.dbname,
       (select case when w.data->>'in_recovery_int' = '0' then 'primary' else 'replica' end from wal w
        where w.dbname = c.dbname order by w.time desc limit 1) as role,
       (select extract(epoch from now() - d.time)::int from db_stats d where d.dbname = c.dbname
        order by d.time desc limit 1) as seen_s_ago,
       (select (d.data->>'postmaster_uptime_s')::int from db_stats d where d.dbname = c.dbname
        order by d.time desc limit 1) as uptime_s
     from (select dbname from configured_dbs where time > now() - '15min'::interval
           union select '{SOURCE}') c
     where not exists (select 1 from db_stats d where d.dbname = c.dbname and d.time > now() - '1s'::interval)""",
    # the latest row of each biggest table, with its vacuum/analyze ages and a schema filter
    f"""select t.*, (l.data->'seconds_since_last_vacuum')::int8, (l.data->'seconds_since_last_analyze')::int8
     from (select dbname, tag_data->>'table_full_name' as tbl, max((data->'total_relation_size_b')::int8) as size
           from table_stats where dbname = '{SOURCE}' and time > now() - '1h'::interval
           and not tag_data->>'schema' ~* 'temp' group by 1, 2 order by 3 desc limit 5) t
     cross join lateral (select data from table_stats s where s.dbname = t.dbname
           and s.tag_data->>'table_full_name' = t.tbl order by s.time desc limit 1) l""",
    # a statement's latest user list and text, its spread in calls and time
    f"""select s.qid, s.calls, s.tt, (select data->>'users' from stat_statements u where u.dbname = '{SOURCE}'
             and u.tag_data->>'queryid' = s.qid order by u.time desc limit 1) as users,
            left(s.query, 100)
     from (select tag_data->>'queryid' as qid, tag_data->>'query' as query,
                  max((data->>'calls')::int8) - min((data->>'calls')::int8) as calls,
                  max((data->>'total_time')::numeric) - min((data->>'total_time')::numeric) as tt
           from stat_statements where dbname = '{SOURCE}' and time > now() - '1h'::interval group by 1, 2) s""",
    # sources grouped by their version string and number
    """select split_part(data->>'server_version', ' ', 1), (data->'server_version_num')::int8,
            string_agg(distinct dbname, ', ') from settings where time > now() - '1h'::interval group by 1, 2""",
    # Pgpool-II nodes: the latest row per source, SELECT counts per node
    """select dbname, tag_data->>'node_id', data->>'role', data->>'status', data->>'lb_weight',
            data->>'replication_delay', (data->>'select_cnt')::int8 from pgpool_stats
     where time = (select max(time) from pgpool_stats)""",
]


def wait_until(predicate, limit: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def row_counts(server: ServerHandle, dbname: str) -> dict[str, int]:
    out = server.psql("select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                      " where n.nspname = 'public' and c.relkind = 'p'", dbname=dbname)
    sql = " union all ".join(f"select '{t}', count(*) from public.{quote_ident(t)}" for t in out.split())
    return {line.split("|")[0]: int(line.split("|")[1]) for line in server.psql(sql, dbname=dbname).splitlines()}


def test_precreated_tables_are_the_catalogues_metric_tables() -> None:
    tables = {m.table for m in load_shipped_definitions().metrics.values()}
    hashes = {t for t in tables if t.endswith("_hashes")}
    assert set(METRIC_TABLES) == tables - hashes - set(CHANGE_TABLES)
    assert len(METRIC_TABLES) == len(set(METRIC_TABLES)) and not set(METRIC_TABLES) & set(CHANGE_TABLES)


def test_dashboard_shaped_queries_run_on_the_storage_of_an_exhaustive_run(
        pg15: ServerHandle, fresh_db: str, tmp_path: Path) -> None:
    source_db = f"dash_src_{uuid.uuid4().hex[:8]}"
    pg15.psql(f"create database {quote_ident(source_db)}")
    create_extensions(pg15, source_db, ["pg_stat_statements"])
    pg15.psql("create table dash_t(id int primary key, v text);"
              " insert into dash_t select i, md5(i::text) from generate_series(1, 500) i;"
              " create index dash_t_v on dash_t(v); analyze dash_t;"
              " create function dash_f(i int) returns int language plpgsql as $$ begin return i + 1; end $$;"
              " select dash_f(i) from generate_series(1, 50) i", dbname=source_db)
    try:
        run_and_query(pg15, fresh_db, source_db, tmp_path)
    finally:
        pg15.psql(f"drop database if exists {quote_ident(source_db)} with (force)")


def sleep_in(server: ServerHandle, dbname: str) -> None:
    with contextlib.suppress(Exception):  # ended by the database's drop when the test failed early
        server.psql("select pg_sleep(8)", dbname=dbname)


def run_and_query(pg15: ServerHandle, fresh_db: str, source_db: str, tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(f"""
[collector]
state_dir = "{tmp_path / 'state'}"

[[sinks]]
type = "postgres"
dsn = "{pg15.dsn(dbname=fresh_db)}"
batching_delay_seconds = 0.2

[[sources]]
name = "{SOURCE}"
dsn = "{pg15.dsn(dbname=source_db)}"
preset = "exhaustive"
""")
    # an active query while the first ticks run: backends' longest_query_seconds has a value to cast
    sleeper = threading.Thread(target=sleep_in, args=(pg15, source_db), daemon=True)
    sleeper.start()
    log = tmp_path / "reaper.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        def stored() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"reaper exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                counts = row_counts(pg15, fresh_db)
            except Exception:  # the sink has not created its schema yet
                return False
            last[:] = [t for t in MUST_HAVE_ROWS if not counts.get(t)]
            return not last

        last: list[str] = []

        wait_until(stored, RUN_LIMIT_SECONDS, f"rows in {MUST_HAVE_ROWS}; none yet in {last}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    queries: list[tuple[str, str]] = []
    for table, columns, cast in READS:
        for column in columns.split():
            what = f"{table}.{column}::{cast}"
            queries.append((f"{what} rate (->>)", rate_query(table, column, cast, "->>")))
            queries.append((f"{what} rate (->)", rate_query(table, column, cast, "->")))
            queries.append((f"{what} last (->)", last_value_query(table, column, cast, "->")))
            queries.append((f"{what} aggregate", aggregate_query(table, column, cast)))
    for table, columns, cast in JSONB_READS:
        for column in columns.split():
            what = f"{table}.{column}::{cast}"
            queries.append((f"{what} rate (->)", rate_query(table, column, cast, "->")))
            queries.append((f"{what} last (->)", last_value_query(table, column, cast, "->")))
    queries += [(f"{table} tag {tag}", tag_query(table, tag)) for table, tag in TAGS]
    queries += [(f"admin: {sql[:60]}", sql) for sql in ADMIN_QUERIES]
    queries += [(f"panel: {' '.join(sql.split())[:60]}", sql) for sql in PANEL_QUERIES]

    failures = []
    for name, sql in queries:
        try:
            pg15.psql(sql, dbname=fresh_db)
        except Exception as e:
            errors = [line for line in str(e).splitlines() if "ERROR:" in line] or [str(e)[-300:]]
            failures.append(f"{name}: {errors[0]}")
    assert not failures, "\n".join(failures)

    counts = row_counts(pg15, fresh_db)
    missing = sorted({t for t, _, _ in READS} - set(counts))
    assert missing == []  # every table a dashboard reads exists, rows or not
    listed = pg15.psql("select metric from admin.all_distinct_dbname_metrics where dbname = 'exhaustive'",
                       dbname=fresh_db).split()
    assert set(MUST_HAVE_ROWS) <= set(listed)
    # the casts ran over real values, among them a running query's age cast with ::int as the health check does
    nonnull = pg15.psql("select count((data->>'xact_commit')::int8) from db_stats", dbname=fresh_db)
    assert int(nonnull) > 0
    longest = pg15.psql("select max((data->>'longest_query_seconds')::int) from backends", dbname=fresh_db)
    assert longest and int(longest) >= 1
    # no stored value is a JSON null (the jsonb casts above would refuse it): a null column is left out
    # of data, as idle samples show (no autovacuum ran, so longest_autovacuum_seconds is SQL NULL there)
    nulls = pg15.psql(" union all ".join(
        f"select '{t}', count(*) from public.{quote_ident(t)}, jsonb_each(data) e where jsonb_typeof(e.value) = 'null'"
        for t in sorted(counts)), dbname=fresh_db)
    assert [line for line in nulls.splitlines() if not line.endswith("|0")] == []
    absent = pg15.psql("select count(*) from backends where not data ? 'longest_autovacuum_seconds'", dbname=fresh_db)
    assert int(absent) > 0
    sleeper.join(timeout=30)
