"""The version matrix: every shipped metric on real PostgreSQL 14, 15, 16, 17 and 18.

One session fixture starts the five servers in parallel (threads), with pg_stat_statements,
pg_buffercache and pgstattuple, a pg_monitor-only role and some activity (tables with indexes and
writes, a function, a sequence, analyze, a physical replication slot streamed to pg_receivewal, an
invalid index, a subscription, a session idle in transaction holding a row lock and another one
blocked on it). Then, per version and as the monitoring role, it runs the SQL the collector would pick
(`MetricDef.sql_for(major)`):

- all of that version's metrics together in ONE combined batch statement (`SourceConnection.run_tick`),
- each metric alone (`conn.fetch(sql)`), and alone but embedded the way the batch embeds it,

and checks: no error, the returned column names are the declared `columns` (for an older version key:
a subset in the same order: `columns` lists every column any version returns), at least one row
unless the metric is in CAN_BE_EMPTY (with the reason),
native types (no json), and an epoch_ns that is an int8 near now.

A metric with no SQL for a version passes only when its description says why (it names a PostgreSQL
version); one that needs an extension the servers lack is recorded as "needs extension X"; special
metrics and non-postgres source kinds are recorded as such. The results go to docs/matrix.json when
REAPER_WRITE_MATRIX=1 (`just test-matrix`); otherwise the committed file must equal this run's results.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from pgserver import (
    PgServer,
    PgServerError,
    cleanup_stale,
    create_extensions,
    create_monitoring_role,
    quote_ident,
)

from reaper import db
from reaper.catalog.docs import MATRIX_VERSIONS
from reaper.catalog.metrics import load_shipped_definitions
from reaper.config.schema import MetricDef

pytestmark = [pytest.mark.matrix, pytest.mark.pg]

VERSIONS = MATRIX_VERSIONS
SETTINGS = {"shared_preload_libraries": "pg_stat_statements", "track_io_timing": "on", "track_functions": "all"}
EXTENSIONS = ("pg_stat_statements", "pg_buffercache", "pgstattuple")
DBNAME = "postgres"
MONITOR_ROLE = "reaper_matrix"
SLOT = "reaper_matrix_slot"
MATRIX_JSON = Path(__file__).resolve().parent.parent / "docs" / "matrix.json"
WRITE_ENV = "REAPER_WRITE_MATRIX"
EPOCH_TOLERANCE_NS = 600 * 10**9
NON_NATIVE_TYPES = frozenset({"json", "jsonb"})

METRICS: Mapping[str, MetricDef] = load_shipped_definitions().metrics
CASES = [(major, name) for major in VERSIONS for name in sorted(METRICS)]

# Metrics that may legitimately return no row on these test servers (a fresh primary with the
# activity below), and why. Every other metric with SQL for a version must return at least one row.
CAN_BE_EMPTY: dict[str, str] = {
    "archiver": "no row while archive_mode is off, as on the test servers",
    "recovery": "standby only: a primary is not in recovery",
    "wal_receiver": "standby only: a primary has no WAL receiver",
    "replication_slot_stats": "pg_stat_replication_slots shows logical slots only; the servers run wal_level=replica",
    "unused_indexes": "lists only never-used indexes over 100 MB",
    "reco_add_index": "needs pg_qualstats samples",
    "reco_default_public_schema": "PostgreSQL 15+ no longer lets PUBLIC create in schema public",
    "reco_partial_index_candidates": "reads pg_stats, which shows a pg_monitor-only role no table it cannot SELECT; "
                                     "and it needs tables of 100k rows",
}

# The activity every server gets before the metrics run (as the superuser, in DBNAME).
ACTIVITY_SQL = f"""
create schema matrix;
create table matrix.orders (
    id bigserial primary key,
    customer int not null,
    amount numeric(10, 2),
    note text,
    created timestamptz not null default now());
create index orders_customer on matrix.orders (customer);
create index orders_customer_again on matrix.orders (customer);
create index orders_note on matrix.orders (note);
create table matrix.customers (id int primary key, name text not null);
insert into matrix.customers select g, 'customer ' || g from generate_series(1, 100) g;
insert into matrix.orders (customer, amount, note)
    select g % 100 + 1, g * 1.5, case when g % 50 = 0 then repeat('x', 3000) end from generate_series(1, 30000) g;
update matrix.orders set amount = amount + 1 where id % 10 = 0;
delete from matrix.orders where id % 97 = 0;
create sequence matrix.tickets;
select nextval('matrix.tickets') from generate_series(1, 10);
create function matrix.customer_total(c int) returns numeric language plpgsql as $$
begin
    return (select sum(amount) from matrix.orders where customer = c);
end $$;
select matrix.customer_total(g) from generate_series(1, 5) g;
create function matrix.definer() returns int language sql security definer as 'select 1';
create function matrix.touch() returns trigger language plpgsql as $$ begin return new; end $$;
create trigger orders_touch before update on matrix.orders for each row execute function matrix.touch();
alter table matrix.orders disable trigger orders_touch;
create view matrix.v_orders as select * from matrix.orders;
create view matrix.v_orders_2 as select * from matrix.v_orders;
create view matrix.v_orders_3 as select * from matrix.v_orders_2;
create view matrix.v_orders_4 as select * from matrix.v_orders_3;
do $$ begin
    for i in 1..10 loop execute format('create role matrix_su_%s superuser login', i); end loop;
end $$;
create publication matrix_pub for table matrix.orders;
create subscription matrix_sub connection 'dbname=nowhere' publication matrix_pub with (connect = false);
select count(*) from matrix.orders o join matrix.customers c on c.id = o.customer where c.id < 10;
select * from matrix.orders where customer = 5 order by id limit 5;
vacuum analyze matrix.orders;
analyze matrix.customers;
select pg_create_physical_replication_slot('{SLOT}', true);
checkpoint;
"""
# Leaves an invalid index behind (the build fails on duplicate keys), for invalid_indexes.
INVALID_INDEX_SQL = "create unique index concurrently orders_customer_unique on matrix.orders (customer)"


@attrs.define
class Case:
    """What one (version, metric) pair did."""

    status: str = "ok"
    failures: list[str] = attrs.field(factory=list)
    rows: int | None = None  # rows returned alone (None: not run)

    def fail(self, message: str) -> None:
        if not self.failures:
            self.status = f"failed: {message}"
        self.failures.append(message)


@attrs.define
class VersionRun:
    major: int
    error: str | None = None  # the server could not be set up
    combined_error: str | None = None  # the one combined statement failed
    batch_size: int = 0
    cases: dict[str, Case] = attrs.field(factory=dict)
    seconds: float = 0.0


@attrs.define
class Prepared:
    server: PgServer
    monitor_dsn: str
    superuser_dsn: str
    receiver: subprocess.Popen[bytes] | None = None  # pg_receivewal, streaming from SLOT


# ---------------------------------------------------------------------------------------------
# servers


def _wait_for(server: PgServer, sql: str, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while server.psql(sql, dbname=DBNAME) != "t":
        if time.monotonic() > deadline:
            raise PgServerError(f"PostgreSQL {server.major}: {what} did not happen within {limit:g} s")
        time.sleep(0.1)


def prepare_server(major: int, servers: list[PgServer], receivers: list[subprocess.Popen[bytes]]) -> Prepared:
    """Start one server and give it extensions, the monitoring role and activity (runs in a thread).

    What it starts goes into `servers` and `receivers` at once, so the caller stops it even when a
    later step fails.
    """
    server = PgServer.create(major=major, settings=SETTINGS)
    servers.append(server)
    create_extensions(server, DBNAME, EXTENSIONS)
    monitor_dsn = create_monitoring_role(server, MONITOR_ROLE)
    server.psql(ACTIVITY_SQL, dbname=DBNAME)
    with contextlib.suppress(PgServerError):
        server.psql(INVALID_INDEX_SQL, dbname=DBNAME)
    prepared = Prepared(server=server, monitor_dsn=monitor_dsn, superuser_dsn=server.dsn(dbname=DBNAME))
    wal_dir = server.run_dir / "receivewal"
    wal_dir.mkdir()
    log_path = server.run_dir / "receivewal.log"
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        prepared.receiver = subprocess.Popen(
            [str(server.bindir / "pg_receivewal"), "-h", str(server.socket_dir), "-p", str(server.port),
             "-U", "postgres", "-D", str(wal_dir), "-S", SLOT, "-n", "-w"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    receivers.append(prepared.receiver)
    try:
        _wait_for(server, "select exists (select from pg_stat_replication where state = 'streaming')",
                  "streaming to pg_receivewal")
    except PgServerError as e:
        raise PgServerError(f"{e}\n--- pg_receivewal ---\n{log_path.read_text(errors='replace')}") from None
    _wait_for(server, "select count(*) > 0 from pg_stat_statements", "pg_stat_statements entries")
    # PostgreSQL 14's backends send their last statistics to the collector as they exit, after psql has returned:
    # the first batch could run before the activity's function calls and block reads were counted (seen: sproc_stats
    # and table_io_stats with no rows in the batch and some alone, under a full test run's load)
    _wait_for(server, "select exists (select from pg_stat_user_functions where calls > 0) and exists (select from"
              " pg_statio_user_tables where heap_blks_hit + heap_blks_read > 0)", "the activity's statistics")
    return prepared


def stop_receiver(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# one version


VERSION_MENTION_RE = re.compile(r"(?i)\b(?:postgres(?:ql)?|pg|version)\s*(\d{2})\b|\b(\d{2})\+")


def explains_missing_sql(metric: MetricDef, major: int) -> bool:
    """The description says why there is no SQL for `major`: it names the newer PostgreSQL it needs
    ("PostgreSQL 16+", "pg_stat_io was added in PostgreSQL 16")."""
    named = [int(a or b) for a, b in VERSION_MENTION_RE.findall(metric.description)]
    return any(v > major for v in named)


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(column in it for column in part)


def embedded(sql: str) -> str:
    """One metric the way the combined statement embeds it."""
    return f"select (select array_agg(t) from ({sql.strip()}) t) as rows"


def typeof_query(sql: str, columns: list[str]) -> str:
    types = ", ".join(f"pg_typeof(t.{quote_ident(c)})::text" for c in columns)
    return f"select array[{types}] as types from ({sql.strip()}) t limit 1"


def combined(batch: Mapping[str, str]) -> str:
    """The shape of the tick's combined statement (for the error message when it fails)."""
    parts = [f"(select array_agg(t) from ({batch[n].strip()}) t) as m{i}" for i, n in enumerate(sorted(batch))]
    return "select pg_is_in_recovery(),\n  " + ",\n  ".join(parts)


async def fetch_or_error(conn: db.SourceConnection, sql: str) -> tuple[list[dict[str, Any]], str | None]:
    try:
        return await conn.fetch(sql), None
    except Exception as e:
        return [], db.describe_error(e)


def check_columns(case: Case, metric: MetricDef, sql: str, got: list[str], where: str) -> None:
    declared = list(metric.columns)
    if not declared:
        case.fail("the definition declares no columns")
    elif not is_subsequence(got, declared):
        case.fail(f"{where}: columns {got} are not the declared {declared} or a subset in that order")


async def check_version(prepared: Prepared) -> VersionRun:
    """Every metric on one server, as the monitoring role, with a lock wait going on meanwhile."""
    major = prepared.server.major
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        holder = await db.open_source_connection(prepared.superuser_dsn, statement_timeout_seconds=120,
                                                 application_name="reaper_matrix_holder", read_only=False)
        stack.push_async_callback(holder.close)
        waiter = await db.open_source_connection(prepared.superuser_dsn, statement_timeout_seconds=120,
                                                 application_name="reaper_matrix_waiter", read_only=False)
        stack.push_async_callback(waiter.close)
        conn = await db.open_source_connection(prepared.monitor_dsn, statement_timeout_seconds=30)
        stack.push_async_callback(conn.close)
        async with trio.open_nursery() as nursery:
            try:
                await holder.execute("begin; update matrix.customers set name = name where id = 1")
                nursery.start_soon(waiter.execute, "update matrix.customers set name = name || '' where id = 1")
                with trio.fail_after(30):
                    while not (await holder.fetch("select count(*) > 0 as b from pg_locks where not granted"))[0]["b"]:
                        await trio.sleep(0.05)
                run = await check_metrics(conn, major)
            finally:
                holder.terminate()  # ends the lock wait: the waiter's update goes through
    run.seconds = time.monotonic() - started
    return run


async def check_metrics(conn: db.SourceConnection, major: int) -> VersionRun:
    run = VersionRun(major=major)
    batch: dict[str, str] = {}
    for name, metric in sorted(METRICS.items()):
        case = run.cases[name] = Case()
        sql = metric.sql_for(major)
        missing = [e for e in metric.requires_extension if e not in conn.server.extensions]
        if "postgres" not in metric.source_kinds:
            case.status = "n/a"
        elif metric.special:
            case.status = "special"
        elif sql is None:
            case.status = f"no SQL for {major}"
            if not explains_missing_sql(metric, major):
                case.fail(f"no SQL for PostgreSQL {major} (keys {sorted(metric.sql)}) and the description "
                          "does not say why (name the PostgreSQL version it needs)")
        elif missing:
            case.status = f"needs extension {', '.join(missing)}"
        else:
            batch[name] = sql
    run.batch_size = len(batch)

    outcome = await conn.run_tick(db.TickRequest(batch=batch))
    if outcome.isolated:
        _rows, error = await fetch_or_error(conn, combined(batch))
        run.combined_error = error or "the combined statement failed (and then worked when run again)"
    now_ns = time.time_ns()
    for name, sql in batch.items():
        case, metric = run.cases[name], METRICS[name]
        if name in outcome.errors:
            case.fail(f"batch: {outcome.errors[name]}")
            continue
        batch_rows = outcome.rows.get(name, [])
        alone_rows, alone_error = await fetch_or_error(conn, sql)
        if alone_error:
            case.fail(f"alone: {alone_error}")
            continue
        case.rows = len(alone_rows)
        _embedded_rows, embedded_error = await fetch_or_error(conn, embedded(sql))
        if embedded_error:
            case.fail(f"embedded: {embedded_error}")
        check_columns(case, metric, sql, list(conn.columns.get(sql, ())), "batch")
        if alone_rows:
            check_columns(case, metric, sql, list(alone_rows[0]), "alone")
        if name not in CAN_BE_EMPTY:
            if not alone_rows:
                case.fail("alone: no rows (add it to CAN_BE_EMPTY with the reason if that is right)")
            elif not outcome.isolated and not batch_rows:
                case.fail("batch: no rows, but alone it returned some")
        if alone_rows:
            epoch = alone_rows[0].get("epoch_ns")
            if not isinstance(epoch, int) or abs(epoch - now_ns) > EPOCH_TOLERANCE_NS:
                case.fail(f"epoch_ns is {epoch!r}, not an int8 of nanoseconds near now")
            columns = list(alone_rows[0])
            types_rows, types_error = await fetch_or_error(conn, typeof_query(sql, columns))
            if types_error:
                case.fail(f"pg_typeof: {types_error}")
            elif types_rows:
                bad = [f"{c} {t}" for c, t in zip(columns, types_rows[0]["types"], strict=True)
                       if t in NON_NATIVE_TYPES]
                if bad:
                    case.fail(f"non-native column types: {', '.join(bad)}")
    return run


async def check_all(prepared: Mapping[int, Prepared]) -> dict[int, VersionRun]:
    results: dict[int, VersionRun] = {}

    async def one(major: int) -> None:
        try:
            results[major] = await check_version(prepared[major])
        except Exception as e:
            results[major] = VersionRun(major=major, error=f"checking failed: {db.describe_error(e)}")

    async with db.open_loop(), trio.open_nursery() as nursery:
        for major in sorted(prepared):
            nursery.start_soon(one, major)
    return results


# ---------------------------------------------------------------------------------------------
# the session: five servers in parallel, one run


def matrix_document(runs: Mapping[int, VersionRun]) -> dict[str, dict[str, str]]:
    """{metric: {version: status}}, as docs/matrix.json holds it."""
    return {name: {str(major): (runs[major].cases[name].status if runs[major].error is None
                                else f"failed: {runs[major].error}")
                   for major in VERSIONS}
            for name in sorted(METRICS)}


def dump_matrix(document: Mapping[str, Mapping[str, str]]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


@pytest.fixture(scope="session")
def matrix() -> Iterator[dict[int, VersionRun]]:
    cleanup_stale()
    servers: list[PgServer] = []
    receivers: list[subprocess.Popen[bytes]] = []
    prepared: dict[int, Prepared] = {}
    runs: dict[int, VersionRun] = {}
    try:
        with ThreadPoolExecutor(max_workers=len(VERSIONS), thread_name_prefix="pg") as pool:
            futures = {major: pool.submit(prepare_server, major, servers, receivers) for major in VERSIONS}
            for major, future in futures.items():
                try:
                    prepared[major] = future.result()
                except Exception as e:
                    runs[major] = VersionRun(major=major, error=f"server set-up failed: {e}")
        runs.update(trio.run(check_all, prepared))
    finally:
        for proc in receivers:
            stop_receiver(proc)
        with ThreadPoolExecutor(max_workers=len(VERSIONS)) as pool:
            list(pool.map(lambda s: s.cleanup(), servers))
    if os.environ.get(WRITE_ENV) == "1":
        MATRIX_JSON.parent.mkdir(parents=True, exist_ok=True)
        MATRIX_JSON.write_text(dump_matrix(matrix_document(runs)), encoding="utf-8")
    yield runs


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("major", VERSIONS)
def test_server_set_up(matrix: dict[int, VersionRun], major: int) -> None:
    error = matrix[major].error
    if error is not None:
        pytest.fail(error, pytrace=False)


@pytest.mark.parametrize("major", VERSIONS)
def test_combined_statement(matrix: dict[int, VersionRun], major: int) -> None:
    """All of a version's metrics work together as one statement (the tick's combined statement)."""
    run = matrix[major]
    if run.error is not None:
        pytest.fail(run.error, pytrace=False)
    assert run.batch_size > 0
    if run.combined_error is not None:
        pytest.fail(f"PostgreSQL {major}: the combined statement failed: {run.combined_error}", pytrace=False)


@pytest.mark.parametrize(("major", "name"), CASES, ids=[f"{name}-pg{major}" for major, name in CASES])
def test_metric(matrix: dict[int, VersionRun], major: int, name: str) -> None:
    run = matrix[major]
    if run.error is not None:
        pytest.fail(run.error, pytrace=False)
    case = run.cases[name]
    if case.failures:
        pytest.fail(f"{name} on PostgreSQL {major}:\n  " + "\n  ".join(case.failures), pytrace=False)


def test_can_be_empty_names_are_metrics_with_a_reason() -> None:
    assert sorted(n for n in CAN_BE_EMPTY if n not in METRICS) == []
    assert all(reason.strip() for reason in CAN_BE_EMPTY.values())


def test_committed_matrix_is_current(matrix: dict[int, VersionRun]) -> None:
    found = matrix_document(matrix)
    if not MATRIX_JSON.exists():
        pytest.fail(f"{MATRIX_JSON} is missing: run `just test-matrix`", pytrace=False)
    committed = json.loads(MATRIX_JSON.read_text(encoding="utf-8"))
    if committed != found:
        stale = sorted(set(found) ^ set(committed))
        changed = [f"{n}: {committed[n]} -> {found[n]}" for n in sorted(set(found) & set(committed))
                   if found[n] != committed[n]]
        pytest.fail(f"{MATRIX_JSON} is stale (run `just test-matrix`): metrics added or removed: {stale}; "
                    f"changed:\n  " + "\n  ".join(changed), pytrace=False)
