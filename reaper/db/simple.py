"""Connections to connection poolers (PgBouncer's admin console, Pgpool-II): the simple query protocol.

PgBouncer's admin console understands only `SHOW ...`-style commands sent with the simple query
protocol: no SELECT, no Parse/Bind (prepared statements), and only a few startup parameters
(`application_name` is accepted; `options`, hence a server-side statement_timeout, is refused with
"unsupported startup parameter"). asyncpg can send a simple query (`execute`) but throws its rows
away, so this module uses psycopg 3 with a client-side-binding cursor (`AsyncClientCursor`), which
sends every statement as one simple Query message and returns its rows with their types (libpq:
.pgpass, service files, TLS and every authentication method come for free).

psycopg's async API runs on asyncio: like reaper.db, all of it stays in here and everything exported
is trio-flavoured (one `aio_as_trio` crossing per tick). The same `SimpleConnection` serves
Pgpool-II's `SHOW POOL_*` commands, which Pgpool answers itself.

What the source loop sees is SourceConnection's interface: `server`, `is_closed`, `run_tick`,
`fetch`, `terminate`, `close`. Differences that matter:

- Each metric runs alone (nothing can be combined); rows and errors are collected per metric.
- No server-side statement_timeout exists on a pooler's console: each command gets a client-side
  deadline (the metric's, else the source's query timeout); running past it drops the connection
  (its state is unknown), which the loop sees as SourceUnavailable.
- Rows get an `epoch_ns` column first (the collector's wall clock when the command returned): the
  SHOW output has no timestamp of its own.
- A tick with nothing due still sends the version command, as the health check (PgBouncer rejects
  anything but its own commands, e.g. pgx's `-- ping`, pgwatch #1570).
- `ServerInfo.version_num` encodes the pooler's own version the way PostgreSQL did before 10
  (major * 10000 + minor * 100 + patch: PgBouncer 1.18.0 -> 11800, Pgpool-II 4.3.5 -> 40305), so
  `ServerInfo.major` is the pooler's major version (1, 4) and a pooler metric's SQL key 0 ("any
  version") is chosen; a key N would mean "pooler major N and later". Never in recovery, no
  extensions, no system identifier (so no instance-level result sharing).
- Values: PgBouncer declares its counters `numeric`; whole values come back as int, not Decimal.
  Pgpool-II sends every column as untyped text; its known numeric and boolean columns are
  converted (an empty string becomes None), the rest stays text.
- Pgpool-II 4.3 answers some SHOW commands with two result sets (an empty one, then the rows): the
  rows of every result set of a command are collected.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Literal

import psycopg
import trio
from psycopg import AsyncClientCursor
from trio_asyncio import aio_as_trio

from reaper.config.redact import scrub
from reaper.db import (
    APPLICATION_NAME,
    ServerInfo,
    SoloQuery,
    TickOutcome,
    TickRequest,
    close_or_terminate,
)
from reaper.db.options import _read_password_file
from reaper.errors import MetricError, SourceUnavailable

PoolerKind = Literal["pgbouncer", "pgpool"]

#: The command that reads each pooler's version; it is also the health check.
VERSION_COMMANDS: dict[str, str] = {"pgbouncer": "SHOW VERSION", "pgpool": "SHOW POOL_VERSION"}
PRODUCT_NAMES: dict[str, str] = {"pgbouncer": "PgBouncer", "pgpool": "Pgpool-II"}

#: Pgpool-II columns (SHOW POOL_NODES, POOL_PROCESSES, POOL_POOLS, POOL_HEALTH_CHECK_STATS,
#: POOL_BACKEND_STATS) that hold numbers or booleans in their text.
PGPOOL_NUMERIC_COLUMNS = frozenset({
    "node_id", "port", "lb_weight", "select_cnt", "replication_delay", "pool_pid", "client_connection_count",
    "pool_counter", "pool_id", "backend_id", "pool_backendpid", "pool_connected", "majorversion",
    "minorversion", "protocolversion", "total_count", "success_count", "fail_count", "skip_count",
    "retry_count", "average_retry_count", "max_retry_count", "max_duration", "min_duration",
    "average_duration", "insert_cnt", "update_cnt", "delete_cnt", "ddl_cnt", "other_cnt", "panic_cnt",
    "fatal_cnt", "error_cnt", "child_pid", "backend_pid",
})
PGPOOL_BOOLEAN_COLUMNS = frozenset({"load_balance_node"})

_INT_RE = re.compile(r"-?\d+")
_FLOAT_RE = re.compile(r"-?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")
_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


class _ConnectionLost(Exception):
    """Raised on the asyncio side when the connection is gone or in an unknown state."""


def describe_error(exc: BaseException) -> str:
    """One line for an operator: no traceback, no password (libpq never echoes it)."""
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        message = diag.message_primary or " ".join(str(exc).split()) or exc.__class__.__name__
        state = exc.sqlstate
        return scrub(f"{message} (SQLSTATE {state})" if state else message)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return scrub(text) or exc.__class__.__name__


def version_number(text: str) -> int:
    """`PgBouncer 1.18.0` -> 11800, `4.3.5 (tamahomeboshi)` -> 40305; 0 when no version is found."""
    m = _VERSION_RE.search(text)
    if m is None:
        return 0
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return major * 10000 + min(minor, 99) * 100 + min(patch, 99)


def _pgbouncer_value(value: Any) -> Any:
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    return value


def _pgpool_value(column: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if column in PGPOOL_NUMERIC_COLUMNS:
        text = value.strip()
        if not text:
            return None
        if _INT_RE.fullmatch(text):
            return int(text)
        if _FLOAT_RE.fullmatch(text):
            return float(text)
        return value
    if column in PGPOOL_BOOLEAN_COLUMNS:
        lowered = value.strip().lower()
        if lowered in ("true", "t", "on", "1"):
            return True
        if lowered in ("false", "f", "off", "0"):
            return False
        return None if not lowered else value
    return value


class SimpleConnection:
    """One connection to a pooler's console; implements reaper.db.link.SourceLink like
    reaper.db.SourceConnection. Each metric runs alone; no size check, no extensions."""

    combines = False
    checks_size = False
    creates_extensions = False

    def __init__(self, conn: psycopg.AsyncConnection[Any], server: ServerInfo, *, kind: PoolerKind,
                 statement_timeout_seconds: float) -> None:
        self._conn = conn
        self.server = server
        self.kind = kind
        self.statement_timeout_seconds = statement_timeout_seconds
        self.columns: dict[str, tuple[str, ...]] = {}  # command -> column names of its last answer
        self.statements = 0

    @property
    def product(self) -> str:
        return self.server.version

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<SimpleConnection {state} {self.server.version} {self.server.address}>"

    @property
    def is_closed(self) -> bool:
        return bool(self._conn.closed)

    # -- ticks -----------------------------------------------------------------------------------

    async def run_tick(self, request: TickRequest) -> TickOutcome:
        """Run every requested command alone, in one crossing. Raises SourceUnavailable when the
        connection breaks (or a command overruns its deadline)."""
        try:
            outcome: TickOutcome = await aio_as_trio(self._run_tick)(request)
        except trio.Cancelled:
            raise
        except _ConnectionLost as e:
            raise SourceUnavailable(str(e)) from e
        self.statements += outcome.statements
        return outcome

    async def run_one(self, name: str, query: SoloQuery) -> list[dict[str, Any]]:
        """One command alone under a client-side deadline (the query's, else the source's).
        MetricError when it fails, SourceUnavailable when the connection breaks or it overruns."""
        seconds = query.statement_timeout_seconds or self.statement_timeout_seconds
        self.statements += 1
        try:
            rows: list[dict[str, Any]] = await aio_as_trio(self._command)(query.sql, seconds)
        except trio.Cancelled:
            raise
        except _ConnectionLost as e:
            raise SourceUnavailable(str(e)) from e
        except psycopg.Error as e:
            raise MetricError(name, describe_error(e)) from e
        return rows

    async def create_extensions(self, names: Sequence[str]) -> dict[str, str | None]:
        """A console has no extensions: nothing is created (reported as such)."""
        return {name: "a pooler's console has no extensions" for name in names}

    async def _run_tick(self, request: TickRequest) -> TickOutcome:
        commands: dict[str, tuple[str, float]] = {
            name: (sql, self.statement_timeout_seconds) for name, sql in request.batch.items()}
        for name, query in (*request.solo.items(), *request.timed.items()):
            commands[name] = (query.sql, query.statement_timeout_seconds or self.statement_timeout_seconds)
        rows: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, str] = {}
        statements = 0
        if not commands:  # the health check: the tick still proves the connection works
            try:
                await self._command(VERSION_COMMANDS[self.kind], self.statement_timeout_seconds)
            except psycopg.Error as e:
                self._drop()
                raise _ConnectionLost(f"health check {VERSION_COMMANDS[self.kind]} failed: {describe_error(e)}") from e
            statements += 1
        for name, (sql, timeout) in commands.items():
            statements += 1
            try:
                rows[name] = await self._command(sql, timeout)
            except psycopg.Error as e:
                errors[name] = describe_error(e)
        return TickOutcome(rows=rows, errors=errors, in_recovery=False, statements=statements, isolated=False)

    async def _command(self, sql: str, seconds: float, *, stamp: bool = True) -> list[dict[str, Any]]:
        """One command, the rows of all its result sets, values normalised; epoch_ns first if `stamp`.

        psycopg.Error means the command failed and the connection is fine; _ConnectionLost otherwise.
        """
        try:
            async with asyncio.timeout(seconds):
                result: list[dict[str, Any]] = []
                async with self._conn.cursor() as cur:
                    await cur.execute(sql.strip())
                    while True:
                        if cur.description is not None:
                            names = tuple(d.name for d in cur.description)
                            self.columns[sql] = names
                            for record in await cur.fetchall():
                                result.append(dict(zip(names, record, strict=True)))
                        if not cur.nextset():
                            break
        except TimeoutError as e:
            self._drop()
            raise _ConnectionLost(f"{sql.strip()!r} did not answer within {seconds:g}s") from e
        except psycopg.Error as e:
            if self._conn.closed:
                raise _ConnectionLost(describe_error(e)) from e
            raise
        except OSError as e:
            self._drop()
            raise _ConnectionLost(describe_error(e)) from e
        epoch_ns = time.time_ns()
        if self.kind == "pgpool":
            result = [{k: _pgpool_value(k, v) for k, v in row.items()} for row in result]
        else:
            result = [{k: _pgbouncer_value(v) for k, v in row.items()} for row in result]
        if stamp:
            result = [{"epoch_ns": epoch_ns, **row} for row in result]
        return result

    # -- the rest of SourceConnection's interface --------------------------------------------------

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """One command's rows as dicts (no epoch_ns). Parameters are not supported on a console.

        Raises SourceUnavailable when the connection breaks, MetricError when the command fails.
        """
        if args:
            raise TypeError("a pooler's console takes no query parameters")
        self.statements += 1
        try:
            return await aio_as_trio(self._command)(sql, self.statement_timeout_seconds, stamp=False)
        except trio.Cancelled:
            raise
        except _ConnectionLost as e:
            raise SourceUnavailable(str(e)) from e
        except psycopg.Error as e:
            raise MetricError(sql.strip(), describe_error(e)) from e

    def terminate(self) -> None:
        """Drop the connection at once (synchronous; always safe)."""
        self._drop()

    def _drop(self) -> None:
        if not self._conn.closed:
            self._conn.pgconn.finish()

    async def close(self) -> None:
        """Close politely within a shielded, bounded scope; terminate if that does not finish."""
        await close_or_terminate(self._conn.close, self._drop)


async def open_simple_connection(dsn: str, *, kind: PoolerKind, statement_timeout_seconds: float,
                                 password_file: str | None = None,
                                 application_name: str = APPLICATION_NAME) -> SimpleConnection:
    """Connect to a PgBouncer admin console (dsn database `pgbouncer`) or to Pgpool-II, and read its
    version (the health check). The caller applies the connect deadline with a trio cancel scope.

    Raises SourceUnavailable when the pooler cannot be reached, refuses us, or does not answer the
    version command (e.g. a kind = "pgbouncer" source pointed at a plain PostgreSQL database).
    """
    if kind not in VERSION_COMMANDS:
        raise ValueError(f"not a pooler kind: {kind!r}")
    password = None
    if password_file:
        try:
            password = await _read_password_file(password_file)
        except OSError as e:
            raise SourceUnavailable(f"cannot read password_file {password_file}: {describe_error(e)}") from e
    try:
        return await aio_as_trio(_connect)(dsn, kind, statement_timeout_seconds, password, application_name)
    except trio.Cancelled:
        raise
    except _ConnectionLost as e:
        raise SourceUnavailable(str(e)) from e
    except (psycopg.Error, OSError) as e:
        raise SourceUnavailable(describe_error(e)) from e


async def _connect(dsn: str, kind: PoolerKind, statement_timeout_seconds: float, password: str | None,
                   application_name: str) -> SimpleConnection:
    kwargs: dict[str, Any] = {
        "autocommit": True,  # no BEGIN: a console has no transactions
        "prepare_threshold": None,  # never prepare
        "cursor_factory": AsyncClientCursor,  # the simple query protocol
        "application_name": application_name,  # PgBouncer accepts it; Pgpool-II passes it on
    }
    if password is not None:
        kwargs["password"] = password
    conn = await psycopg.AsyncConnection.connect(dsn, **kwargs)
    try:
        info = conn.info
        host = info.host or ""
        address = host if host.startswith("/") else f"{host}:{info.port}"
        server = ServerInfo(version_num=0, version="", in_recovery=False, database=info.dbname,
                            system_identifier=None, extensions=frozenset(),
                            is_local=host.startswith("/") or host in ("127.0.0.1", "::1", "localhost"),
                            address=address)
        simple = SimpleConnection(conn, server, kind=kind, statement_timeout_seconds=statement_timeout_seconds)
        command = VERSION_COMMANDS[kind]
        try:
            rows = await simple._command(command, statement_timeout_seconds, stamp=False)
        except psycopg.Error as e:
            what = "PgBouncer's admin console (database pgbouncer)" if kind == "pgbouncer" else "Pgpool-II"
            raise _ConnectionLost(f"{command} failed: {describe_error(e)} (is this {what}?)") from e
        text = next((str(v) for row in rows for v in row.values() if v), "")
        if not text:
            raise _ConnectionLost(f"{command} returned no version")
        if not text.lower().startswith(PRODUCT_NAMES[kind].lower()):
            text = f"{PRODUCT_NAMES[kind]} {text}"
        simple.server = ServerInfo(version_num=version_number(text), version=text, in_recovery=False,
                                   database=server.database, system_identifier=None, extensions=frozenset(),
                                   is_local=server.is_local, address=address)
    except BaseException:
        conn.pgconn.finish()
        raise
    return simple
