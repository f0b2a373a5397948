"""asyncpg code of the `postgres` sink: connecting, schema migrations, COPY, partitions, retention.

Everything exported is trio-flavoured. Each operation is one `aio_as_trio` crossing: connecting (with the
schema check or migration), a whole flush (partition upkeep, then the data transaction), a maintenance
run. Failures come out as `StorageError`; `connection_lost` says the connection is gone (the caller
drops it and reconnects on its next write). A cancelled operation terminates the connection: asyncpg
may have been mid-protocol.

A flush is ONE transaction: it records the batch's fingerprint in admin.reaper_flushes, COPYs (binary,
`copy_records_to_table`) each table's rows into public."<table>", and adds new (dbname, metric) pairs to
admin.all_distinct_dbname_metrics. So a batch is either stored whole or not at all, and a batch
retried after an unacknowledged COMMIT finds its fingerprint and is skipped instead of written twice.
Partitions are ensured before that transaction, in their own one; a partition someone dropped meanwhile
(SQLSTATE 23514) or a dropped table (42P01) forgets the cache, re-ensures every row time and retries once.

The rows reach COPY from an asyncio task of their own (`CopyFeed`, reaper/db/copy_feed.py) that runs
the sink's lazy JSON encoding a bounded number of chunks ahead, whenever COPY waits for the server: PostgreSQL's parsing
(the bottleneck) and our Python work then overlap on two cores.

TimescaleDB: when the extension is in the database at the first init, admin.storage_schema_type says
'timescale', metric tables are hypertables (admin.ensure_partition_timescale) and the partition cache is
replaced by a set of tables known to exist; retention goes through the same admin functions. That path is
small on purpose and untested here (no TimescaleDB on this machine).
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import attrs
import trio
from trio_asyncio import aio_as_trio

from reaper.db import (
    close_or_terminate,
    describe_error,
    is_connection_error,
    tls,
    tolerate_abandoned_connection_futures,
)
from reaper.db.copy_feed import CopyFeed
from reaper.db.options import _read_password_file
from reaper.db.storage_schema import (
    BOOTSTRAP_SQL,
    LATEST_VERSION,
    LOCK_CLASS,
    MIGRATION_LOCK,
    MIGRATIONS,
    interval_sql,
)
from reaper.errors import SinkError, SinkRejected

log = logging.getLogger("reaper.db.storage")

COLUMNS = ("time", "dbname", "data", "tag_data")
CLOSE_GRACE_SECONDS = 2.0
FLUSH_FINGERPRINT_DAYS = 2  # how long committed flush fingerprints are kept to recognise a retried batch

_MIN_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)
_MAX_TIME = dt.datetime.max.replace(tzinfo=dt.UTC)

#: a row of a metric table, in COLUMNS order: (time, dbname, data json text, tag_data json text)
Record = tuple[dt.datetime, str, str, str]


class StorageError(SinkError, OSError):
    """The storage database could not do what was asked. Also an OSError: every sink caller retries those.

    `connection_lost` is true when the connection is unusable (the sink reconnects on its next write).
    """

    def __init__(self, message: str, *, connection_lost: bool = False) -> None:
        super().__init__(message)
        self.connection_lost = connection_lost

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "storage error"


@attrs.frozen
class TableRows:
    """The rows of one flush for one metric table.

    `records` may be produced lazily (the sink encodes while COPY streams, so its Python work overlaps the
    server's parsing) and must be iterable again (a repaired flush re-sends them). `times` holds every
    distinct row time, for the partition checks.
    """

    table: str
    records: Iterable[Record]
    times: Sequence[dt.datetime]
    count: int


@attrs.frozen
class FlushRequest:
    fingerprint: bytes  # identifies the batch: a retry of a committed batch is skipped
    tables: Sequence[TableRows]
    listing: frozenset[tuple[str, str]]  # (dbname, table) pairs for admin.all_distinct_dbname_metrics


@attrs.frozen
class FlushResult:
    rows: int
    tables: int
    duplicate: bool  # this batch had been committed already (its earlier COMMIT was not acknowledged)
    partitions_checked: int  # ensure-partition calls made (0 when the cache knew every row's partition)
    repaired: bool  # a missing partition/table was re-created and the transaction retried


@attrs.frozen
class SchemaState:
    version: int
    schema_type: str  # 'postgres' or 'timescale'
    applied: tuple[int, ...] = ()  # migrations applied by this call


@attrs.frozen
class MaintenanceResult:
    dropped_partitions: int
    listing_changes: int
    pruned_fingerprints: int
    kept_locked: int = 0  # old partitions left for the next run: another session (a dashboard's query) held them


# How long retention waits for an old partition's lock. Dropping a partition locks its metric table ACCESS
# EXCLUSIVE: while that waits behind a dashboard's long query, every later reader and writer of the table queues
# behind it (dashboards froze for the whole write timeout, 60 s). Past this the partition is left for next time.
DROP_LOCK_TIMEOUT = "1s"
_OLD_PARTITIONS = """select p.part, parent.relname::text as metric
from admin.get_old_time_partitions($1::interval, 'postgres') as p(part)
join pg_catalog.pg_inherits i on i.inhrelid = p.part::regclass
join pg_catalog.pg_class parent on parent.oid = i.inhparent"""


#: what a storage operation may raise that is not a bug; asyncpg's InternalClientError means its protocol
#: state is confused (e.g. by a server shutdown message that arrived while idle): the connection is dropped
_STORAGE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, EOFError)


_CLIENT_DATA_ERROR = asyncpg.exceptions._base.DataError  # asyncpg cannot encode a value (client side)


class StorageRejected(SinkRejected):
    """The storage refuses a batch for what it holds, not for an outage: a data exception (SQLSTATE class 22,
    e.g. `invalid byte sequence for encoding "UTF8": 0x00`) or a value asyncpg cannot encode. Retrying the
    same batch cannot succeed; the sink's task sets the refused measurements aside (rejected/)."""


#: a server that takes no writes: a standby (the primary failed over and this one was left, or the dsn's first host
#: is a replica) or one with default_transaction_read_only on. Its connection is dropped: the next write connects
#: again, and with several hosts in the dsn finds the one that takes writes (WRITER_TARGET)
READ_ONLY_SQLSTATE = "25006"
NO_WRITER_FIX = ("point the dsn at the primary, or name every host of the cluster in it (host1:5432,host2:5432) and "
                 "reaper writes to the one that takes writes")
#: libpq's target_session_attrs for a storage connection whose dsn does not say: reaper writes, so of a dsn's hosts
#: it wants the one that takes writes (libpq's own default, any, takes the first that answers, a standby too)
WRITER_TARGET = "read-write"


def _translate(exc: BaseException) -> StorageError | StorageRejected:
    if isinstance(exc, _CLIENT_DATA_ERROR) or (isinstance(exc, asyncpg.PostgresError)
                                               and str(getattr(exc, "sqlstate", "")).startswith("22")):
        return StorageRejected(describe_error(exc))
    return StorageError(describe_storage_error(exc), connection_lost=is_connection_error(exc) or _is_read_only(exc))


def _is_read_only(exc: BaseException) -> bool:
    return ((isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", "") == READ_ONLY_SQLSTATE)
            or isinstance(exc, asyncpg.TargetServerAttributeNotMatched))


def describe_storage_error(exc: BaseException) -> str:
    """describe_error, and for a server that takes no writes what to do about it."""
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return ("no host of the dsn takes writes (each is a standby, or has default_transaction_read_only = on): "
                + NO_WRITER_FIX)
    text = describe_error(exc)
    if _is_read_only(exc):
        return f"{text}: the storage server takes no writes (a standby, or default_transaction_read_only = on): " \
               + NO_WRITER_FIX
    return text


class StorageConnection:
    """One connection to the metrics database, with caches of the partitions and listing pairs it knows."""

    def __init__(self, conn: Any, schema: SchemaState, partition_seconds: int) -> None:
        self._conn = conn
        self.schema = schema
        self.partition_seconds = partition_seconds
        self._ranges: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}  # table -> sorted partition bounds
        self._tables: set[str] = set()  # tables known to exist (timescale flavour)
        self._listed: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        state = "closed" if self._conn.is_closed() else "open"
        return (f"<StorageConnection {state} schema=v{self.schema.version} {self.schema.schema_type} "
                f"tables={len(self._ranges) or len(self._tables)}>")

    @property
    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())

    @property
    def address(self) -> str:
        """host:port of the server this connection reached (of a dsn naming several, the one that takes writes)."""
        addr = getattr(self._conn, "_addr", None)  # (asyncpg keeps the address it connected to)
        if isinstance(addr, tuple) and len(addr) >= 2:
            return f"{addr[0]}:{addr[1]}"
        return str(addr or "?")

    async def _cross(self, fn: Any, *args: Any) -> Any:
        """Run one asyncio coroutine function; translate errors; a cancelled call kills the connection."""
        try:
            return await aio_as_trio(fn)(*args)
        except trio.Cancelled:
            self.terminate()
            raise
        except _STORAGE_ERRORS as e:
            error = _translate(e)
            if isinstance(error, StorageError) and error.connection_lost:
                self.terminate()
            raise error from e

    # -- writing ---------------------------------------------------------------------------------------

    async def flush(self, request: FlushRequest) -> FlushResult:
        """Store a batch in one transaction, or raise StorageError having stored nothing."""
        result: FlushResult = await self._cross(self._flush, request)
        return result

    async def _flush(self, request: FlushRequest) -> FlushResult:
        checked = await self._ensure(request.tables)
        try:
            written = await self._write(request)
            repaired = False
        except (asyncpg.CheckViolationError, asyncpg.UndefinedTableError) as e:
            # a partition (23514: no partition for the row) or a table was dropped behind our back
            log.warning("storage: %s; re-creating partitions and retrying the flush", describe_error(e))
            for rows in request.tables:
                self._ranges.pop(rows.table, None)
                self._tables.discard(rows.table)
            checked += await self._ensure(request.tables)
            written = await self._write(request)
            repaired = True
        return FlushResult(rows=written if written is not None else 0, tables=len(request.tables),
                           duplicate=written is None, partitions_checked=checked, repaired=repaired)

    async def _write(self, request: FlushRequest) -> int | None:
        conn = self._conn
        new_pairs = request.listing - self._listed
        async with conn.transaction():
            fresh = await conn.fetchval(
                "insert into admin.reaper_flushes (fingerprint) values ($1) on conflict do nothing returning true",
                request.fingerprint)
            if not fresh:
                return None
            rows = 0
            async with CopyFeed(request.tables) as encoder:
                for index, table_rows in enumerate(request.tables):
                    await conn.copy_records_to_table(table_rows.table, schema_name="public", columns=COLUMNS,
                                                     records=encoder.records(index))
                    rows += table_rows.count
            if new_pairs:
                pairs = sorted(new_pairs)
                await conn.execute(
                    "insert into admin.all_distinct_dbname_metrics (dbname, metric)"
                    " select * from unnest($1::text[], $2::text[]) on conflict do nothing",
                    [p[0] for p in pairs], [p[1] for p in pairs])
        self._listed |= new_pairs
        return rows

    async def _ensure(self, tables: Iterable[TableRows]) -> int:
        """Make sure every row time has a table and a partition; the number of ensure calls made.

        The cache holds the bounds of the partitions this connection saw; only a time outside all of them
        costs a call (which also pre-creates the partitions after it)."""
        conn = self._conn
        calls = 0
        if self.schema.schema_type == "timescale":
            missing = [t.table for t in tables if t.table not in self._tables]
            if missing:
                async with conn.transaction():
                    for table in missing:
                        await conn.execute("select admin.ensure_dummy_metrics_table($1)", table)
                        calls += 1
                self._tables.update(missing)
            return calls
        width = dt.timedelta(seconds=self.partition_seconds)
        pending: list[tuple[str, list[tuple[dt.datetime, dt.datetime]], list[dt.datetime]]] = []
        for table_rows in tables:
            ranges = list(self._ranges.get(table_rows.table, ()))  # kept only once the partitions are committed
            uncovered = [t for t in table_rows.times if not _covered(ranges, t)]
            if uncovered:
                pending.append((table_rows.table, ranges, uncovered))
        if not pending:
            return 0
        async with conn.transaction():
            # creating a partition locks its metric table ACCESS EXCLUSIVE: behind a dashboard's long query that
            # would queue every reader of the table too; past DROP_LOCK_TIMEOUT it is an outage (spilled, retried)
            await conn.execute("select set_config('lock_timeout', $1, true)", DROP_LOCK_TIMEOUT)
            for table, ranges, uncovered in pending:
                for t in uncovered:
                    if _covered(ranges, t):
                        continue
                    row = await conn.fetchrow(
                        "select part_available_from, part_available_to"
                        " from admin.ensure_partition_metric_time($1, $2, $3::interval)", table, t, width)
                    calls += 1
                    bisect.insort(ranges, (_bound(row[0], _MIN_TIME), _bound(row[1], _MAX_TIME)))
        for table, ranges, _ in pending:
            self._ranges[table] = ranges
        return calls

    async def was_committed(self, fingerprint: bytes) -> bool:
        """Whether a flush with this fingerprint is stored (to settle a flush whose COMMIT went unanswered)."""
        found = await self._cross(self._conn.fetchval,
                                  "select exists (select from admin.reaper_flushes where fingerprint = $1)",
                                  fingerprint)
        return bool(found)

    # -- upkeep ----------------------------------------------------------------------------------------

    async def maintain(self, retention_days: int) -> MaintenanceResult:
        """Drop partitions older than retention_days (0 keeps all), refresh the listing, prune fingerprints."""
        result: MaintenanceResult = await self._cross(self._maintain, retention_days)
        return result

    async def _maintain(self, retention_days: int) -> MaintenanceResult:
        conn = self._conn
        dropped = kept = 0
        older = dt.timedelta(days=retention_days)
        if retention_days > 0 and self.schema.schema_type == "postgres":
            busy: set[str] = set()  # tables whose lock was not had: their other old partitions would wait too
            for part, metric in await conn.fetch(_OLD_PARTITIONS, older):  # each in a transaction of its own
                if metric in busy:
                    kept += 1
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute("select set_config('lock_timeout', $1, true), "
                                           "pg_advisory_xact_lock($2, hashtext($3))", DROP_LOCK_TIMEOUT, LOCK_CLASS,
                                           metric)
                        await conn.execute(f"drop table if exists {part}")  # (regclass text: quoted, qualified)
                    dropped += 1
                except asyncpg.LockNotAvailableError:
                    kept += 1
                    busy.add(metric)
        elif retention_days > 0:
            async with conn.transaction():
                await conn.execute("select set_config('lock_timeout', $1, true)", DROP_LOCK_TIMEOUT)
                try:
                    dropped = await conn.fetchval("select admin.drop_old_time_partitions($1::interval)", older)
                except asyncpg.LockNotAvailableError:
                    kept = 1
        listing = await conn.fetchval("select admin.maintain_unique_sources()")
        status = await conn.execute("delete from admin.reaper_flushes where written_at < now() - $1::interval",
                                    dt.timedelta(days=FLUSH_FINGERPRINT_DAYS))
        self._ranges.clear()  # dropped partitions must not be trusted; listing rows may have gone
        self._tables.clear()
        self._listed.clear()
        return MaintenanceResult(dropped_partitions=int(dropped or 0), listing_changes=int(listing or 0),
                                 pruned_fingerprints=int(status.split()[-1]), kept_locked=kept)

    # -- closing ---------------------------------------------------------------------------------------

    def terminate(self) -> None:
        """Drop the connection at once (synchronous; always safe)."""
        if not self._conn.is_closed():
            self._conn.terminate()

    async def close(self) -> None:
        """Close politely within a shielded, bounded scope; terminate if that does not finish."""
        await close_or_terminate(self._conn.close, self.terminate)


def _bound(value: dt.datetime | None, unbounded: dt.datetime) -> dt.datetime:
    """A partition bound from the server; null (timescale) and +-infinity (naive from asyncpg) are open."""
    return value if value is not None and value.tzinfo is not None else unbounded


def _covered(ranges: list[tuple[dt.datetime, dt.datetime]], t: dt.datetime) -> bool:
    return any(lo <= t < hi for lo, hi in ranges)


# ------------------------------------------------------------------------------------------------------
# connecting and the schema


async def open_storage(dsn: str, *, partition_seconds: int, password_file: str | None = None,
                       statement_timeout_seconds: float = 60.0,
                       application_name: str = "reaper") -> StorageConnection:
    """Connect, create or upgrade the schema when needed, and read its flavour. Raises StorageError.

    The caller applies the connect deadline with a trio cancel scope.
    """
    kwargs = await _connect_kwargs(password_file, statement_timeout_seconds, application_name, dsn)
    try:
        conn, schema = await aio_as_trio(_connect_and_migrate)(dsn, kwargs, None)
    except trio.Cancelled:
        raise
    except (*_STORAGE_ERRORS, ValueError) as e:
        raise StorageError(describe_storage_error(e), connection_lost=True) from e
    return StorageConnection(conn, schema, partition_seconds)


async def init_storage(dsn: str, *, partition_interval_seconds: int | None = None,
                       password_file: str | None = None) -> SchemaState:
    """`reaper storage init`: create or upgrade the schema (and record the default partition width), then close."""
    kwargs = await _connect_kwargs(password_file, 0, "reaper", dsn)
    try:
        conn, schema = await aio_as_trio(_connect_and_migrate)(dsn, kwargs, partition_interval_seconds)
    except trio.Cancelled:
        raise
    except (*_STORAGE_ERRORS, ValueError) as e:
        raise StorageError(describe_storage_error(e), connection_lost=True) from e
    await StorageConnection(conn, schema, partition_interval_seconds or 86400).close()
    return schema


async def _connect_kwargs(password_file: str | None, statement_timeout_seconds: float,
                          application_name: str, dsn: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "server_settings": {
            "application_name": application_name,
            "statement_timeout": str(int(statement_timeout_seconds * 1000)),
        },
        "statement_cache_size": 100,
    }
    if "target_session_attrs" not in dsn.lower() and not os.environ.get("PGTARGETSESSIONATTRS"):
        kwargs["target_session_attrs"] = WRITER_TARGET
    if password_file:
        try:
            kwargs["password"] = await _read_password_file(password_file)
        except OSError as e:
            raise StorageError(f"cannot read password_file {password_file}: {describe_error(e)}",
                               connection_lost=True) from e
    return kwargs


async def _connect_and_migrate(dsn: str, kwargs: dict[str, Any],
                               partition_interval_seconds: int | None) -> tuple[Any, SchemaState]:
    tolerate_abandoned_connection_futures(asyncio.get_running_loop())  # tools may open their own loop
    conn = await tls.connect(dsn, kwargs)
    try:
        schema = await _migrate(conn)
        if partition_interval_seconds is not None:
            await conn.execute(
                "insert into admin.config (key, value) values ('partition_interval', $1)"
                " on conflict (key) do update set value = excluded.value, last_modified_on = now()",
                interval_sql(partition_interval_seconds))
    except BaseException:
        conn.terminate()
        raise
    return conn, schema


async def _migrate(conn: Any) -> SchemaState:
    """Apply the pending migrations in order, each once, under an advisory lock; return the schema state."""
    current = await _schema_version(conn)
    applied: list[int] = []
    if current < LATEST_VERSION:
        async with conn.transaction():
            await conn.execute("select pg_advisory_xact_lock($1, $2)", LOCK_CLASS, MIGRATION_LOCK)
            await conn.execute(BOOTSTRAP_SQL)
            current = await conn.fetchval("select coalesce(max(version), 0) from admin.reaper_schema_version")
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                await conn.execute(migration.sql)
                await conn.execute("insert into admin.reaper_schema_version (version, description) values ($1, $2)",
                                   migration.version, migration.description)
                applied.append(migration.version)
                current = migration.version
        descriptions = {m.version: m.description for m in MIGRATIONS}
        for version in applied:
            log.info("storage: applied schema migration %d: %s", version, descriptions[version])
    elif current > LATEST_VERSION:
        log.warning("storage: schema version %d is newer than this reaper knows (%d); using it as it is",
                    current, LATEST_VERSION)
    schema_type = await conn.fetchval("select schema_type from admin.storage_schema_type limit 1")
    return SchemaState(version=current, schema_type=str(schema_type or "postgres"), applied=tuple(applied))


async def _schema_version(conn: Any) -> int:
    exists = await conn.fetchval("select to_regclass('admin.reaper_schema_version') is not null")
    if not exists:
        return 0
    return int(await conn.fetchval("select coalesce(max(version), 0) from admin.reaper_schema_version"))
