"""postgres sink: pgwatch-compatible storage (one table per metric, time partitions, the admin schema).

The write contract. The caller (`reaper.sinks.run_sink`) hands over a batch and, when `write` raises,
retries the SAME batch until it succeeds. So `write(batch)` is one flush: it returns only after the
whole batch is committed in ONE transaction, or raises having stored nothing (an OSError: a
`StorageError`). Nothing is held inside the sink between calls, so a measurement the caller believes
written is on disk, and a spill queue in front of the sink needs nothing from it.

A retry cannot duplicate rows. A failed transaction stored nothing. The one ambiguous case is a
connection lost around COMMIT (it may have gone through unanswered): the transaction also records the
batch's fingerprint in admin.reaper_flushes, so (1) the same batch sent again is recognised there and
skipped, and (2) before its next write the sink looks the fingerprint up and, when that flush was
committed, skips its measurements in whatever batches they come back (the caller may regroup them, e.g.
from its spill queue).

Rows. Each row of a measurement becomes (time, dbname, data, tag_data) in public."<its table>" (the
metric's storage_name or its name): time from the row's own epoch_ns (else the measurement's), dbname =
the source name, data = every value column including epoch_ns, tag_data = the source's custom tags plus
the tag_ columns with the prefix stripped and their values as text (null tags left out). Values are
encoded as pgwatch (Go) writes them, as every JSON sink does (reaper/sinks/encode.py): `300`, not `300.0`;
timestamps as ISO 8601 text; intervals as seconds. A null value (SQL NULL, NaN, an infinity) is left out
of `data`: the dashboards' jsonb casts `(data->'col')::int8` refuse a JSON null (without_nulls).

Batching. The caller drains whatever its channel holds into a batch (so batches grow by themselves
under load). To spare the storage database a commit per tick of every source, a batch smaller than
`batch_size` waits until `batching_delay_seconds` have passed since the previous flush; meanwhile the
next batch gathers in the channel. An idle sink writes at once; a busy one flushes about once per delay.

Connection. Connected (and the schema created or upgraded) in `open()`; a storage database that is down
at start does not stop the daemon: the sink connects on its first write instead. A lost connection makes
`write` raise (the caller keeps the batch) and the next write reconnects. Each write is bounded by
`write_timeout_seconds`, each connect by `connect_timeout_seconds`.

Maintenance (retention). The Sink protocol gives a sink no nursery, and a second connection racing the
writes gains nothing, so upkeep runs inside `write`, after a successful commit, when
`maintenance_interval_seconds` have passed (the first time right after the first flush): drop the
partitions older than `retention_days` (0 keeps everything), refresh admin.all_distinct_dbname_metrics,
prune old fingerprints. Its failure is logged and retried later; it never fails the write (the batch
is already committed). A sink that receives nothing expires nothing, but then nothing new is stored.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import trio

from reaper.config.redact import redact_dsn
from reaper.config.schema import PostgresSinkConfig
from reaper.db.storage import (
    DROP_LOCK_TIMEOUT,
    FlushRequest,
    MaintenanceResult,
    Record,
    StorageConnection,
    StorageError,
    TableRows,
    open_storage,
)
from reaper.db.storage_schema import parse_partition_interval
from reaper.errors import ConfigError
from reaper.measurement import Measurement
from reaper.sinks.encode import dumps

log = logging.getLogger("reaper.sinks.postgres")

MAINTENANCE_RETRY_SECONDS = 300.0  # a failed maintenance run is retried this soon (or at the interval)
MAX_REMEMBERED_KEYS = 100_000  # measurements remembered as committed after an unanswered COMMIT

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")  # jsonb refuses \u0000 in strings
_EMPTY_OBJECT = "{}"
# NUL characters removed from stored text (jsonb and text cannot hold them), for the log line and status
nul_removed = [0]


class PostgresSink:
    def __init__(self, config: PostgresSinkConfig) -> None:
        self.config = config
        self.label = config.label
        problems = []
        try:
            self.partition_seconds = parse_partition_interval(config.partition_interval)
        except ValueError as e:
            problems.append(f"sink {self.label}: {e}")
        if config.batch_size < 1:
            problems.append(f"sink {self.label}: batch_size: must be 1 or more")
        if config.retention_days < 0:
            problems.append(f"sink {self.label}: retention_days: must be 0 (keep everything) or more")
        for key in ("batching_delay_seconds", "maintenance_interval_seconds"):
            if getattr(config, key) < 0:
                problems.append(f"sink {self.label}: {key}: must be 0 or more")
        for key in ("connect_timeout_seconds", "write_timeout_seconds"):
            if getattr(config, key) <= 0:
                problems.append(f"sink {self.label}: {key}: must be more than 0")
        if problems:
            raise ConfigError(problems)
        self._conn: StorageConnection | None = None
        self._last_flush: float | None = None
        self._next_maintenance: float | None = None
        self._unsettled: tuple[bytes, list[MeasurementKey]] | None = None  # a flush whose COMMIT went unanswered
        self._stored: dict[MeasurementKey, None] = {}  # measurements known to be committed, skipped if retried
        self.flushes = 0
        self.written = 0  # measurements
        self.rows = 0
        self.duplicates = 0  # batches found already committed (their COMMIT's answer had been lost)
        self._nul_warned = False
        self.last_maintenance: MaintenanceResult | None = None

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None and not self._conn.is_closed else "disconnected"
        return f"<PostgresSink {self.label} {state} flushes={self.flushes} written={self.written} rows={self.rows}>"

    # -- the Sink protocol -----------------------------------------------------------------------------

    async def open(self, beside: trio.Nursery | None = None) -> None:
        """Connect and create or upgrade the schema; a storage database that is down is retried on write."""
        try:
            await self._connection()
        except StorageError as e:
            log.warning("sink %s: storage cannot be used at start (%s); connecting again on the first write "
                        "(`reaper check --connect` says what its role may lack)", self.label, e)

    async def write(self, batch: list[Measurement]) -> None:
        """Commit the whole batch in one transaction, or raise StorageError (an OSError) having stored nothing."""
        await self._pace(len(batch))
        conn = await self._connection()
        if self._unsettled is not None:
            await self._settle(conn)
        todo = [m for m in batch if measurement_key(m) not in self._stored] if self._stored else batch
        request = encode_batch(todo)
        started = trio.current_time()
        nul_before = nul_removed[0]
        if request is not None:
            try:
                result = await self._bounded(conn, "write", conn.flush, request)
            except StorageError as e:
                if e.connection_lost:  # the COMMIT may have gone through unanswered: settled before the next write
                    self._unsettled = (request.fingerprint, [measurement_key(m) for m in todo])
                raise
            self.rows += result.rows
            if result.duplicate:
                self.duplicates += 1
                log.warning("sink %s: this batch of %d measurements had been committed already (the answer to "
                            "its COMMIT was lost); not written again", self.label, len(todo))
            if nul_removed[0] > nul_before and not self._nul_warned:
                self._nul_warned = True
                log.warning("sink %s: removed NUL characters from stored text (PostgreSQL's text and jsonb cannot "
                            "hold them; %d so far, said once)", self.label, nul_removed[0])
            log.debug("sink %s: wrote %d measurements, %d rows, %d tables in %.1f ms (%d partition checks)",
                      self.label, len(todo), result.rows, result.tables, (trio.current_time() - started) * 1000,
                      result.partitions_checked)
        if len(todo) < len(batch):
            skipped = len(batch) - len(todo)
            self.duplicates += 1
            for m in batch:
                self._stored.pop(measurement_key(m), None)
            log.warning("sink %s: %d measurements of this batch had been committed already (the answer to their "
                        "COMMIT was lost); not written again", self.label, skipped)
        self._last_flush = trio.current_time()
        self.flushes += 1
        self.written += len(batch)
        await self._maybe_maintain()

    async def _settle(self, conn: StorageConnection) -> None:
        """Find out whether the flush that lost its connection was committed; remember its measurements if so."""
        assert self._unsettled is not None
        fingerprint, keys = self._unsettled
        committed = await self._bounded(conn, "looking up the interrupted flush", conn.was_committed, fingerprint)
        self._unsettled = None
        if committed:
            log.warning("sink %s: the flush interrupted by the connection loss had been committed; its %d "
                        "measurements will not be written again", self.label, len(keys))
            for key in keys:
                self._stored[key] = None
            while len(self._stored) > MAX_REMEMBERED_KEYS:
                del self._stored[next(iter(self._stored))]

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    # -- maintenance -----------------------------------------------------------------------------------

    async def run_maintenance(self) -> MaintenanceResult:
        """Retention and upkeep now (also what write() runs every maintenance_interval_seconds)."""
        conn = await self._connection()
        result: MaintenanceResult = await self._bounded(conn, "maintenance", conn.maintain, self.config.retention_days)
        self.last_maintenance = result
        log.info("sink %s: maintenance: %d partitions older than %d days dropped, %d listing rows changed%s",
                 self.label, result.dropped_partitions, self.config.retention_days, result.listing_changes,
                 f"; {result.kept_locked} left for the next run (another session's query held its table longer "
                 f"than {DROP_LOCK_TIMEOUT})" if result.kept_locked else "")
        return result

    async def _maybe_maintain(self) -> None:
        interval = self.config.maintenance_interval_seconds
        now = trio.current_time()
        if interval <= 0 or (self._next_maintenance is not None and now < self._next_maintenance):
            return
        try:
            await self.run_maintenance()
        except StorageError as e:
            self._next_maintenance = now + min(interval, MAINTENANCE_RETRY_SECONDS)
            log.warning("sink %s: maintenance failed: %s; trying again in %.0fs", self.label, e,
                        self._next_maintenance - now)
            return
        self._next_maintenance = now + interval

    # -- internals -------------------------------------------------------------------------------------

    async def _pace(self, size: int) -> None:
        """A small batch waits until batching_delay_seconds after the previous flush (see the module doc)."""
        if size >= self.config.batch_size or self._last_flush is None:
            return
        await trio.sleep_until(self._last_flush + self.config.batching_delay_seconds)

    async def _connection(self) -> StorageConnection:
        if self._conn is not None and not self._conn.is_closed:
            return self._conn
        self._conn = None
        dsn = self.config.dsn  # load_config expanded its variables already (once: `$$` stays `$`)
        try:
            with trio.fail_after(self.config.connect_timeout_seconds):
                conn = await open_storage(dsn, partition_seconds=self.partition_seconds,
                                          password_file=self.config.password_file,
                                          statement_timeout_seconds=self.config.write_timeout_seconds)
        except trio.TooSlowError:
            raise StorageError(f"connect timed out after {self.config.connect_timeout_seconds:g}s",
                               connection_lost=True) from None
        self._conn = conn
        hosts = dsn.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1] if "://" in dsn else dsn
        several = "," in hosts  # a dsn naming several hosts: say which one took the connection
        log.info("sink %s: connected to %s%s (schema v%d, %s%s)", self.label, redact_dsn(dsn),
                 f", at {conn.address}" if several else "", conn.schema.version, conn.schema.schema_type,
                 f", applied migrations {list(conn.schema.applied)}" if conn.schema.applied else "")
        return conn

    async def _bounded(self, conn: StorageConnection, what: str, operation: Callable[..., Awaitable[Any]],
                       *args: Any) -> Any:
        """One storage operation under write_timeout_seconds; a broken or timed-out connection is dropped."""
        try:
            with trio.fail_after(self.config.write_timeout_seconds):
                return await operation(*args)
        except trio.TooSlowError:
            self._forget(conn)
            raise StorageError(f"{what} timed out after {self.config.write_timeout_seconds:g}s",
                               connection_lost=True) from None
        except StorageError as e:
            if e.connection_lost or conn.is_closed:
                self._forget(conn)
            raise

    def _forget(self, conn: StorageConnection) -> None:
        conn.terminate()
        if self._conn is conn:
            self._conn = None


# ------------------------------------------------------------------------------------------------------
# encoding: measurements -> rows of (time, dbname, data, tag_data)


MeasurementKey = tuple[str, str, str, int, int]


def measurement_key(m: Measurement) -> MeasurementKey:
    """What identifies a measurement (a retried one has the same key)."""
    return (m.source, m.metric, m.table, m.epoch_ns, len(m.rows))


def encode_batch(batch: Sequence[Measurement]) -> FlushRequest | None:
    """The batch as a flush: per table its row times and lazily encoded records; None when it has no rows.

    Only the cheap part happens here (grouping, row times, the fingerprint); the JSON encoding runs while
    COPY streams the records, so it overlaps the server's work.
    """
    groups: dict[str, list[Measurement]] = {}
    times: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    listing: set[tuple[str, str]] = set()
    digest = hashlib.blake2b(digest_size=16)
    for m in batch:
        digest.update(repr(measurement_key(m)).encode())
        if not m.rows:
            continue
        if m.table not in groups:
            groups[m.table], times[m.table], counts[m.table] = [], set(), 0
        groups[m.table].append(m)
        counts[m.table] += len(m.rows)
        table_times = times[m.table]
        for row in m.rows:
            ns = row.get("epoch_ns")
            table_times.add(ns if type(ns) is int else m.epoch_ns)
        listing.add((m.source.replace("\x00", ""), m.table))  # text cannot hold NUL (counted below)
    if not groups:
        return None
    tables = [TableRows(table, EncodedRows(groups[table]), sorted(time_of(ns, 0) for ns in times[table]),
                        counts[table])
              for table in sorted(groups)]
    return FlushRequest(fingerprint=digest.digest(), tables=tables, listing=frozenset(listing))


class EncodedRows:
    """The COPY records of some measurements, encoded when iterated (and again on every iteration)."""

    def __init__(self, measurements: Sequence[Measurement]) -> None:
        self.measurements = measurements

    def __iter__(self) -> Iterator[Record]:
        for m in self.measurements:
            yield from encode_measurement(m)


def encode_measurement(m: Measurement) -> Iterator[Record]:
    """One record per row: time from its epoch_ns, values (epoch_ns included) to data, tags to tag_data.

    tag_data = the source's custom tags plus the row's tag_ columns, prefix stripped and values as text.
    """
    custom = dict(m.tags)
    custom_json = dumps_json(custom) if custom else _EMPTY_OBJECT
    last_ns: int | None = None
    last_time = _EPOCH
    source = m.source
    if "\x00" in source:  # text cannot hold NUL
        nul_removed[0] += source.count("\x00")
        source = source.replace("\x00", "")
    shape: Any = None  # the keys of the previous row, and what they imply
    tag_keys: list[str] = []
    tag_names: list[str] = []
    for row in m.rows:
        values: dict[str, Any] = row if type(row) is dict else dict(row)
        if shape is None or values.keys() != shape:
            shape = values.keys()
            tag_keys = [k for k in shape if k.startswith("tag_")]
            tag_names = [k[4:] for k in tag_keys]
        if tag_keys:
            tags = custom.copy()
            for key, name in zip(tag_keys, tag_names, strict=True):
                v = values[key]
                if v is not None:
                    tags[name] = v if type(v) is str else tag_text(v)
            values = values.copy()
            for key in tag_keys:
                del values[key]
            tags_json = dumps_json(tags) if tags else _EMPTY_OBJECT
        else:
            tags_json = custom_json
        for v in values.values():
            if v is None or (type(v) is float and v - v != 0) or (type(v) is decimal.Decimal and not v.is_finite()):
                values = without_nulls(values)
                break
        ns = values.get("epoch_ns")
        if type(ns) is not int:
            ns = m.epoch_ns
            values = {**values, "epoch_ns": ns}
        if ns != last_ns:
            last_time = time_of(ns, m.epoch_ns)
            last_ns = ns
        yield (last_time, source, dumps_json(values), tags_json)


def without_nulls(values: dict[str, Any]) -> dict[str, Any]:
    """The row without its null values (SQL NULL, NaN, infinities): the key is left out of `data`.

    pgwatch's dashboards read many columns as jsonb, `(data->'longest_query_seconds')::int8`, and that cast
    refuses a JSON null ("cannot cast jsonb null to type bigint") where a missing key gives SQL NULL; so a
    panel over a time range with one idle sample would fail. pgwatch's docs say NULLs are not stored.
    """
    return {k: v for k, v in values.items()
            if not (v is None or (type(v) is float and v - v != 0)
                    or (type(v) is decimal.Decimal and not v.is_finite()))}


def time_of(ns: int, fallback_ns: int) -> dt.datetime:
    """An aware UTC datetime from epoch nanoseconds (microsecond precision, as timestamptz)."""
    try:
        return _EPOCH + dt.timedelta(microseconds=ns // 1000)
    except OverflowError:
        return _EPOCH + dt.timedelta(microseconds=fallback_ns // 1000)


def tag_text(value: Any) -> str:
    """A tag value as text (tags are labels): strings as they are, booleans as true/false."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def dumps_json(value: Mapping[str, Any]) -> str:
    """JSON text for a jsonb column (reaper/sinks/encode.py), with NUL escapes removed (jsonb rejects them)."""
    data = dumps(value)
    if b"\\u0000" in data:
        data, removed = _NUL_ESCAPE.subn(rb"\1", data)
        nul_removed[0] += removed
    return data.decode()
