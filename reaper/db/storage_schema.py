"""The PostgreSQL storage layout (pgwatch-compatible), as numbered migrations. Pure: no I/O.

Layout (names, columns and function signatures match pgwatch's so its Grafana dashboards and its
`admin.*` upkeep work; the SQL is our own):

    admin.storage_schema_type          one row: 'postgres' (native partitions) or 'timescale'
    admin.metrics_template             (time, dbname, data jsonb, tag_data jsonb): what metric tables copy
    admin.all_distinct_dbname_metrics  (dbname, metric) pairs for Grafana's drop-downs
    admin.config                       key/value settings (partition and TimescaleDB chunk widths)
    admin.reaper_schema_version        one row per applied migration: upgrades are explicit
    admin.reaper_flushes               fingerprints of recently committed flushes (a retried batch is never
                                       written twice)
    public."<metric>"                  one table per metric (or storage_name), PARTITION BY RANGE (time)
    subpartitions."<metric>_YYYYMMDD"  its time partitions (`_YYYYMMDD_HH24` below one day), aligned in UTC

Each migration runs once, in order, in one transaction under an advisory lock, and is written so that
it also adopts a schema pgwatch created (IF NOT EXISTS, CREATE OR REPLACE).
"""

from __future__ import annotations

import re

import attrs

from reaper.db.storage_tables import CHANGE_TABLES, DASHBOARD_TABLES, METRIC_TABLES

#: advisory lock class ('reap'); objid 0 = migrations, 1 = maintenance, hashtext(metric) = one metric's DDL
LOCK_CLASS = 0x72656170
MIGRATION_LOCK = 0
MAINTENANCE_LOCK = 1

#: the comments pgwatch's upkeep and dashboards look for
TABLE_COMMENT = "pgwatch-generated-metric-lvl"
PARTITION_COMMENT = "pgwatch-generated-metric-time-lvl"

PRECREATE_PARTITIONS = 3
MIN_PARTITION_SECONDS = 3600
MAX_PARTITION_SECONDS = 7 * 86400
#: partitions are aligned to multiples of their width counted from this instant (a Monday, 00:00 UTC), so
#: a day starts at midnight UTC and a week on Monday
ALIGN_ORIGIN_SECONDS = 946857600  # 2000-01-03T00:00:00Z

_UNIT_SECONDS = {"hour": 3600, "hours": 3600, "h": 3600, "day": 86400, "days": 86400, "d": 86400,
                 "week": 604800, "weeks": 604800, "w": 604800}


def parse_partition_interval(text: str) -> int:
    """`"1 day"`, `"6 hours"`, `"1 week"` -> seconds; whole hours from 1 hour to 1 week, else ValueError."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-z]+)\s*", text.lower())
    if not m or m.group(2) not in _UNIT_SECONDS:
        raise ValueError(f"partition_interval {text!r}: expected e.g. \"1 hour\", \"6 hours\", \"1 day\", \"1 week\"")
    seconds = int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if not MIN_PARTITION_SECONDS <= seconds <= MAX_PARTITION_SECONDS:
        raise ValueError(f"partition_interval {text!r}: must be from 1 hour to 1 week")
    return seconds


def interval_sql(seconds: int) -> str:
    """Seconds as a PostgreSQL interval literal in whole hours (`'24 hours'`): no calendar-day DST surprises."""
    return f"{seconds // 3600} hours"


def partition_start_ns(time_ns: int, width_seconds: int) -> int:
    """Start of the aligned partition holding `time_ns` (same arithmetic as admin.ensure_partition_metric_time)."""
    width_ns = width_seconds * 1_000_000_000
    origin_ns = ALIGN_ORIGIN_SECONDS * 1_000_000_000
    return origin_ns + (time_ns - origin_ns) // width_ns * width_ns


@attrs.frozen
class Migration:
    version: int
    description: str
    sql: str


_LOCK = f"{LOCK_CLASS}, hashtext(metric)"

# Every routine we (re)create in migration 1; others of the same name (pgwatch's older overloads, or its
# procedure/function variants) are dropped first so that calls are never ambiguous.
_ROUTINES = ("reaper_partition_bounds", "ensure_dummy_metrics_table", "ensure_partition_timescale",
             "ensure_partition_metric_time", "get_top_level_metric_tables", "get_old_time_partitions",
             "drop_old_time_partitions", "maintain_unique_sources", "truncate_all_metric_tables",
             "drop_all_metric_tables")

_V1_TABLES = f"""
create schema if not exists admin;
create schema if not exists subpartitions;

do $do$
begin
    if to_regclass('admin.storage_schema_type') is null then
        create table admin.storage_schema_type (
            schema_type    text        not null check (schema_type in ('postgres', 'timescale')),
            initialized_on timestamptz not null default now()
        );
        create unique index storage_schema_type_single_row on admin.storage_schema_type ((true));
        comment on table admin.storage_schema_type is
            'storage flavour of this metrics database: postgres (time partitions) or timescale (hypertables)';
    end if;
    if to_regclass('admin.metrics_template') is null then
        create table admin.metrics_template (
            time     timestamptz not null default now(),
            dbname   text collate "C" not null,  /* byte order: cheaper (dbname, time) index inserts */
            data     jsonb       not null,
            tag_data jsonb,
            check (false)  /* a template: rows go to the metric tables created LIKE it */
        );
        create index metrics_template_dbname_time_idx on admin.metrics_template (dbname, time);
        comment on table admin.metrics_template is 'column and index template of every metric table';
    end if;
end
$do$;

insert into admin.storage_schema_type (schema_type)
select case when exists (select from pg_catalog.pg_extension where extname = 'timescaledb')
            then 'timescale' else 'postgres' end
where not exists (select from admin.storage_schema_type);

create table if not exists admin.all_distinct_dbname_metrics (
    dbname     text        not null,
    metric     text        not null,
    created_on timestamptz not null default now(),
    primary key (dbname, metric)
);
comment on table admin.all_distinct_dbname_metrics is 'which source (dbname) has data in which metric table';

create table if not exists admin.config (
    key              text        not null primary key,
    value            text        not null,
    created_on       timestamptz not null default now(),
    last_modified_on timestamptz
);
insert into admin.config (key, value)
values ('partition_interval', '24 hours'), ('timescale_chunk_interval', '2 days'),
       ('timescale_compress_interval', '1 day')
on conflict (key) do nothing;

create table if not exists admin.reaper_flushes (
    fingerprint bytea       not null primary key,
    written_at  timestamptz not null default now()
);
comment on table admin.reaper_flushes is
    'one row per batch reaper committed recently: a batch retried after an unacknowledged commit is skipped';

do $do$
declare
    r record;
begin
    for r in select p.oid::regprocedure as signature, p.prokind
             from pg_catalog.pg_proc p
             where p.pronamespace = 'admin'::regnamespace
               and p.proname in ({", ".join(f"'{name}'" for name in _ROUTINES)})
    loop
        execute format('drop %s %s', case r.prokind when 'p' then 'procedure' else 'function' end, r.signature);
    end loop;
end
$do$;
"""

_V1_FUNCTIONS = f"""
/* The time partitions attached to a metric table, with their bounds (from the partition bound expression). */
create function admin.reaper_partition_bounds(parent regclass)
returns table (partition_name regclass, lower_bound timestamptz, upper_bound timestamptz)
language sql stable as $fn$
    select i.inhrelid::regclass,
           coalesce(b.m[1]::timestamptz, '-infinity'),
           coalesce(b.m[2]::timestamptz, 'infinity')
    from pg_catalog.pg_inherits i
    cross join lateral (
        select regexp_match(pg_catalog.pg_get_expr(c.relpartbound, c.oid),
                            $re$FROM \\((?:'([^']*)'|MINVALUE)\\) TO \\((?:'([^']*)'|MAXVALUE)\\)$re$) as m
        from pg_catalog.pg_class c
        where c.oid = i.inhrelid
    ) b
    where i.inhparent = parent and b.m is not null
$fn$;

/* Creates public."<metric>" (without partitions) unless it exists; true when it was created. */
create function admin.ensure_dummy_metrics_table(metric text)
returns boolean
language plpgsql as $fn$
begin
    if to_regclass(format('public.%I', metric)) is not null then
        return false;
    end if;
    perform pg_advisory_xact_lock({_LOCK});
    if to_regclass(format('public.%I', metric)) is not null then
        return false;  /* created by someone else while we waited */
    end if;
    if (select s.schema_type from admin.storage_schema_type s limit 1) = 'timescale' then
        perform admin.ensure_partition_timescale(metric);
    else
        execute format('create table public.%I (like admin.metrics_template including defaults including indexes)'
                       ' partition by range (time)', metric);
        execute format('comment on table public.%I is %L', metric, '{TABLE_COMMENT}');
    end if;
    return true;
end
$fn$;

/* TimescaleDB flavour: public."<metric>" as a hypertable, compressed by dbname (untested without the extension). */
create function admin.ensure_partition_timescale(metric text)
returns void
language plpgsql as $fn$
declare
    rel text := format('public.%I', metric);
begin
    perform pg_advisory_xact_lock({_LOCK});
    if to_regclass(rel) is not null then
        return;
    end if;
    execute format('create table %s (like admin.metrics_template including defaults including indexes)', rel);
    execute format('comment on table %s is %L', rel, '{TABLE_COMMENT}');
    execute 'select create_hypertable($1::regclass, ''time''::name, chunk_time_interval => $2)'
        using rel, (select c.value::interval from admin.config c where c.key = 'timescale_chunk_interval');
    execute format('alter table %s set (timescaledb.compress, timescaledb.compress_segmentby = %L)', rel, 'dbname');
    execute 'select add_compression_policy($1::regclass, $2)'
        using rel, (select c.value::interval from admin.config c where c.key = 'timescale_compress_interval');
end
$fn$;

/*
  Makes sure public."<metric>" exists and has a partition for metric_timestamp and for the
  partitions_to_precreate widths after it; returns the bounds of the partition holding metric_timestamp.
  Partitions are aligned to multiples of the width from Monday 2000-01-03 00:00 UTC; when existing
  partitions (of another width) overlap the aligned range, the new one is clipped to the gap.
  partition_period null = admin.config 'partition_interval' (set by `reaper storage init`), else 1 day.
*/
create function admin.ensure_partition_metric_time(
    metric text,
    metric_timestamp timestamptz,
    partition_period interval default null,
    partitions_to_precreate int default {PRECREATE_PARTITIONS},
    out part_available_from timestamptz,
    out part_available_to timestamptz)
returns record
language plpgsql as $fn$
declare
    width_s float8 := extract(epoch from coalesce(
        partition_period,
        (select c.value::interval from admin.config c where c.key = 'partition_interval'),
        interval '24 hours'));
    width interval;
    origin_s constant float8 := {ALIGN_ORIGIN_SECONDS};
    parent regclass;
    target timestamptz;
    lo timestamptz;
    hi timestamptz;
    below timestamptz;
    above timestamptz;
    base text;
    suffix text;
    part_name text;
    n int;
begin
    if width_s < {MIN_PARTITION_SECONDS} or width_s > {MAX_PARTITION_SECONDS} or width_s::numeric % 3600 <> 0 then
        raise exception 'partition period must be whole hours from 1 hour to 1 week, got %', partition_period;
    end if;
    width := make_interval(secs => width_s);  /* fixed length: a day is 24 hours whatever the TimeZone */
    perform pg_advisory_xact_lock({_LOCK});
    perform admin.ensure_dummy_metrics_table(metric);
    if (select s.schema_type from admin.storage_schema_type s limit 1) = 'timescale' then
        return;  /* a hypertable makes its own chunks */
    end if;
    parent := to_regclass(format('public.%I', metric));
    if not exists (select from pg_catalog.pg_partitioned_table p where p.partrelid = parent) then
        part_available_from := '-infinity';  /* a plain table (made by hand) takes every row as it is */
        part_available_to := 'infinity';
        return;
    elsif (select p.partstrat from pg_catalog.pg_partitioned_table p where p.partrelid = parent) <> 'r' then
        raise exception '% is not partitioned by range (time), as older pgwatch versions made it', parent
            using hint = 'let pgwatch migrate it, or rename it away so that a new table is created';
    end if;
    for i in 0 .. greatest(partitions_to_precreate, 0) loop
        target := metric_timestamp + i * width;
        select b.lower_bound, b.upper_bound into lo, hi
        from admin.reaper_partition_bounds(parent) b
        where target >= b.lower_bound and target < b.upper_bound;
        if not found then
            lo := to_timestamp(origin_s + floor((extract(epoch from target)::float8 - origin_s) / width_s) * width_s);
            hi := lo + width;
            select max(b.upper_bound) into below from admin.reaper_partition_bounds(parent) b
            where b.upper_bound <= target;
            select min(b.lower_bound) into above from admin.reaper_partition_bounds(parent) b
            where b.lower_bound > target;
            lo := greatest(lo, below);
            hi := least(hi, above);
            suffix := to_char(lo at time zone 'UTC',
                              case when width >= interval '24 hours' and (lo at time zone 'UTC')::time = '00:00'
                                   then 'YYYYMMDD' else 'YYYYMMDD_HH24' end);
            base := metric;
            if octet_length(base) + 1 + octet_length(suffix) > 63 then  /* keep names unique within 63 bytes */
                while octet_length(base) > 63 - 11 - octet_length(suffix) loop
                    base := left(base, -1);
                end loop;
                base := base || '_' || left(md5(metric), 8);
            end if;
            part_name := base || '_' || suffix;
            n := 1;
            while to_regclass(format('subpartitions.%I', part_name)) is not null loop  /* e.g. a detached leftover */
                n := n + 1;
                part_name := base || '_' || suffix || '_' || n;
            end loop;
            execute format('create table subpartitions.%I partition of %s for values from (%L) to (%L)',
                           part_name, parent, lo, hi);
            execute format('comment on table subpartitions.%I is %L', part_name, '{PARTITION_COMMENT}');
        end if;
        if i = 0 then
            part_available_from := lo;
            part_available_to := hi;
        end if;
    end loop;
end
$fn$;

/* Every metric table in public (marked by its comment and having a time column). */
create function admin.get_top_level_metric_tables(out table_name text)
returns setof text
language sql stable as $fn$
    select c.oid::regclass::text
    from pg_catalog.pg_class c
    where c.relnamespace = 'public'::regnamespace
      and c.relkind in ('r', 'p')
      and pg_catalog.obj_description(c.oid, 'pg_class') = '{TABLE_COMMENT}'
      and exists (select from pg_catalog.pg_attribute a
                  where a.attrelid = c.oid and a.attname = 'time' and not a.attisdropped)
    order by 1
$fn$;

/* Time partitions (or TimescaleDB chunks) whose whole range is older than now() - older_than. */
create function admin.get_old_time_partitions(older_than interval, schema_type text default '')
returns setof text
language plpgsql stable as $fn$
declare
    flavour text := coalesce(nullif($2, ''), (select s.schema_type from admin.storage_schema_type s limit 1));
begin
    if flavour = 'postgres' then
        return query
            select b.partition_name::text
            from admin.get_top_level_metric_tables() t
            cross join lateral admin.reaper_partition_bounds(t.table_name::regclass) b
            join pg_catalog.pg_class c on c.oid = b.partition_name
            where c.relnamespace = 'subpartitions'::regnamespace
              and b.upper_bound < now() - older_than
            order by 1;
    elsif flavour = 'timescale' then
        return query execute
            'select ch::text from timescaledb_information.hypertables h
             cross join lateral show_chunks(format(''%I.%I'', h.hypertable_schema, h.hypertable_name)::regclass,
                                            older_than => $1) ch
             where h.hypertable_schema = ''public'' order by 1'
            using older_than;
    else
        raise exception 'unknown storage schema type %', flavour;
    end if;
end
$fn$;

/* Drops what get_old_time_partitions returns; the number dropped. */
create function admin.drop_old_time_partitions(older_than interval, schema_type text default '')
returns int
language plpgsql as $fn$
declare
    flavour text := coalesce(nullif($2, ''), (select s.schema_type from admin.storage_schema_type s limit 1));
    r record;
    dropped int := 0;
begin
    if flavour = 'postgres' then
        for r in select p.part::regclass as part, parent.relname::text as metric
                 from admin.get_old_time_partitions(older_than, 'postgres') as p(part)
                 join pg_catalog.pg_inherits i on i.inhrelid = p.part::regclass
                 join pg_catalog.pg_class parent on parent.oid = i.inhparent
        loop
            perform pg_advisory_xact_lock({LOCK_CLASS}, hashtext(r.metric));
            execute format('drop table if exists %s', r.part);
            dropped := dropped + 1;
        end loop;
    elsif flavour = 'timescale' then
        execute 'select count(*) from timescaledb_information.hypertables h
                 cross join lateral drop_chunks(format(''%I.%I'', h.hypertable_schema, h.hypertable_name)::regclass,
                                                older_than => $1)
                 where h.hypertable_schema = ''public'''
            into dropped using older_than;
    else
        raise exception 'unknown storage schema type %', flavour;
    end if;
    return dropped;
end
$fn$;

/* Brings admin.all_distinct_dbname_metrics in line with the data; the number of listing rows changed. */
create function admin.maintain_unique_sources()
returns int
language plpgsql as $fn$
declare
    t record;
    present text[];
    metrics text[] := '{{}}';
    changed int := 0;
    n int;
begin
    if not pg_try_advisory_xact_lock({LOCK_CLASS}, {MAINTENANCE_LOCK}) then
        return 0;  /* another writer is doing it right now */
    end if;
    for t in select c.oid::regclass as rel, c.relname::text as metric
             from admin.get_top_level_metric_tables() g
             join pg_catalog.pg_class c on c.oid = g.table_name::regclass
    loop
        metrics := metrics || t.metric;
        /* distinct dbnames by skipping along the (dbname, time) index, one probe per value */
        execute format($q$
            with recursive walk(dbname) as (
                (select x.dbname from %1$s x order by x.dbname limit 1)
                union all
                select (select x.dbname from %1$s x where x.dbname > w.dbname order by x.dbname limit 1)
                from walk w where w.dbname is not null)
            select coalesce(array_agg(dbname), '{{}}') from walk where dbname is not null$q$, t.rel)
            into present;
        delete from admin.all_distinct_dbname_metrics a where a.metric = t.metric and a.dbname <> all (present);
        get diagnostics n = row_count;
        changed := changed + n;
        insert into admin.all_distinct_dbname_metrics (dbname, metric)
        select d, t.metric from unnest(present) d
        on conflict do nothing;
        get diagnostics n = row_count;
        changed := changed + n;
    end loop;
    delete from admin.all_distinct_dbname_metrics a where a.metric <> all (metrics);
    get diagnostics n = row_count;
    return changed + n;
end
$fn$;

/* Empties every metric table (keeping tables and partitions); the number of tables. */
create function admin.truncate_all_metric_tables()
returns int
language plpgsql as $fn$
declare
    t text;
    n int := 0;
begin
    for t in select table_name from admin.get_top_level_metric_tables() loop
        execute 'truncate table ' || t;
        n := n + 1;
    end loop;
    truncate admin.all_distinct_dbname_metrics;
    return n;
end
$fn$;

/* Drops every metric table, one partition per transaction (CALL it outside a transaction block). */
create procedure admin.drop_all_metric_tables()
language plpgsql as $fn$
declare
    tables text[];
    parts text[];
    t text;
    p text;
begin
    tables := array(select table_name from admin.get_top_level_metric_tables());
    foreach t in array coalesce(tables, '{{}}') loop
        parts := array(select i.inhrelid::regclass::text from pg_catalog.pg_inherits i
                       where i.inhparent = t::regclass);
        foreach p in array coalesce(parts, '{{}}') loop
            execute 'drop table if exists ' || p;
            commit;
        end loop;
        execute 'drop table if exists ' || t;
        commit;
    end loop;
    truncate admin.all_distinct_dbname_metrics;
end
$fn$;

select admin.ensure_dummy_metrics_table(name)
from unnest(array[{", ".join(f"'{t}'" for t in (*CHANGE_TABLES, *METRIC_TABLES))}]) as name;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "pgwatch-compatible layout: admin schema, template, helper functions, change and metric tables",
              _V1_TABLES + _V1_FUNCTIONS),
    Migration(2, "empty tables pgwatch's dashboards read for metrics reaper does not collect (btree_bloat, ...)",
              f"select admin.ensure_dummy_metrics_table(name) from unnest(array{list(DASHBOARD_TABLES)}) as name;"),
)

LATEST_VERSION = MIGRATIONS[-1].version

#: run before the migrations, under the migration lock: where the applied versions are recorded
BOOTSTRAP_SQL = """
create schema if not exists admin;
create table if not exists admin.reaper_schema_version (
    version     int         not null primary key,
    description text        not null,
    applied_at  timestamptz not null default now()
);
"""
