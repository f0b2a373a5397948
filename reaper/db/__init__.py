"""The only module that touches asyncio, asyncpg or trio-asyncio. Everything it exports is trio-flavoured.

One `aio_as_trio` crossing per operation that matters: connecting (with its set-up queries) is one,
and a whole tick (describing new metrics, the combined batch, the isolation re-runs and the solo
metrics) is one. asyncpg errors are translated here into reaper's vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import attrs
import trio
from trio_asyncio import aio_as_trio

from reaper.db import pooler
from reaper.db.aioloop import AWAITED
from reaper.db.aioloop import open_loop as open_loop  # (the daemon, the CLI and the tools open it here)
from reaper.db.aioloop import tolerate_abandoned_connection_futures as tolerate_abandoned_connection_futures
from reaper.db.combined import Members
from reaper.db.conntune import RECV_BYTES as RECV_BYTES  # (tests read it here)
from reaper.db.conntune import tune
from reaper.db.describe import describe_all, refused_sqls, repeated_names
from reaper.db.facts import EXTENSIONS_REPINNED_SQL, PIN_SEARCH_PATH, SERVER_FACTS_SQL, SYSTEM_ID_SQL
from reaper.db.failures import describe_error, is_connection_error, unresolved_hint  # (others take the first two here)
from reaper.db.options import APPLICATION_NAME, connect_options
from reaper.db.options import STATEMENT_CACHE_SIZE as STATEMENT_CACHE_SIZE  # (tests read it here)
from reaper.db.recordsafe import READ_FAILURES, Batchable, RecordSafety, is_decode_error, read_hint, record_safe_sql
from reaper.db.rows import RowLimit, RowShape, TooManyRows, describe, go_rows
from reaper.db.tick import ServerInfo, SoloQuery, TickOutcome, TickRequest
from reaper.errors import MetricError, SourceUnavailable

log = logging.getLogger("reaper.db")
REDESCRIBE_SECONDS = 600.0  # a connection describes its metrics' queries again this often (SourceConnection)
CLOSE_GRACE_SECONDS = 2.0


# Every statement reaper sends to a monitored server first makes its own transaction read-only, in the same
# statement: `default_transaction_read_only = on` (set at connect) can be switched off by any SQL
# (`set_config('default_transaction_read_only', 'off', false)` in one tick makes the next one read-write),
# but PostgreSQL refuses to make a transaction read-write again once a query ran in it ("transaction
# read-write mode must be set before any query"). The FROM item is produced before any metric's subquery
# runs, so nextval(), a writing function or a second set_config inside a metric all fail. Costs no round trip.
READ_ONLY_GUARD = "(select set_config('transaction_read_only', 'on', true)) as reaper_read_only"
EXTENSIONS_SQL = f"{EXTENSIONS_REPINNED_SQL} from {READ_ONLY_GUARD}"


def read_only(sql: str) -> str:
    """One query wrapped so that it runs in a read-only transaction whatever it does; columns unchanged."""
    return f"select reaper_q.* from {READ_ONLY_GUARD},\n  lateral ({sql.strip()}\n) as reaper_q"


# A metric's own statement_timeout_seconds is a SESSION setting that the connection remembers: a run under the
# timeout the session has sends one statement, a change one set_config first (RESET: back to the connect value).
SET_TIMEOUT = f"select set_config('statement_timeout', $1, false) from {READ_ONLY_GUARD}"


def timeout_ms(seconds: float | None) -> str | None:
    """The session statement_timeout reaper wants for a statement: milliseconds, None for the connect default."""
    return None if seconds is None else str(int(seconds * 1000))


class SourceConnection(RecordSafety):
    """One connection to a monitored server, with its server facts and a column-name cache.

    Implements reaper.db.link.SourceLink; `statements` counts what it has sent since it opened.
    """

    combines = True  # a tick's metrics share one combined statement
    checks_size = True
    creates_extensions = True
    guard = READ_ONLY_GUARD

    def __init__(self, conn: Any, server: ServerInfo) -> None:
        self._conn = conn
        self.server = server
        self.columns: dict[str, tuple[str, ...]] = {}  # sql text -> column names
        self.described_until = time.monotonic() + REDESCRIBE_SECONDS  # then `columns` is forgotten (_run_tick)
        self.shapes: dict[str, RowShape | None] = {}  # sql text -> which of its columns need Go's number form
        self.statements = 0  # counted where each statement is sent (the asyncio side)
        self.timeout: str | None = None  # the session's statement_timeout as last set (None: the connect default)
        self.rewrites: dict[str, str] = {}  # sql -> what the batch sends for it (reaper.db.recordsafe)
        self.unbatched: set[str] = set()  # sqls whose records asyncpg cannot read: sent alone
        self.as_text: set[str] = set()  # sqls whose date and time columns go as text (reaper.db.recordsafe)
        self.said_repeats: set[str] = set()  # metrics whose repeated column names were said (_say_repeats)
        self.members = Members(self.rewrites)  # the batch statement's metrics (reaper.db.combined)
        self.pooled = isinstance(conn, pooler.Pooled)  # behind a connection pooler: no session state (reaper.db.pooler)

    @property
    def product(self) -> str:
        return f"PostgreSQL {self.server.version}" + (" through a connection pooler" if self.pooled else "")

    def __repr__(self) -> str:
        state = "closed" if self._conn.is_closed() else "open"
        return f"<SourceConnection {state} pg{self.server.major} {self.server.database}>"

    @property
    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())

    async def run_tick(self, request: TickRequest) -> TickOutcome:
        """Run a whole tick in one crossing. Raises SourceUnavailable when the connection breaks."""
        return await crossing(self._run_tick, request)

    async def run_one(self, name: str, query: SoloQuery) -> list[dict[str, Any]]:
        """One metric alone, under its own statement timeout when it has one (see SET_TIMEOUT).
        MetricError when it fails, SourceUnavailable when the connection breaks."""
        try:
            rows: list[dict[str, Any]] = await crossing(self._run_solo, query, name)
        except READ_FAILURES as e:
            raise MetricError(name, self._why(e)) from e
        return rows

    def _why(self, e: BaseException) -> str:
        """A metric's failure in one line (a name not found: where reaper looked, reaper.db.facts)."""
        return describe_error(e) + unresolved_hint(e, self.server.search_path) + read_hint(e)

    async def _use_timeout(self, seconds: float | None) -> None:
        """Give the session the statement_timeout `seconds` (None: the connect default) unless it has it."""
        wanted = timeout_ms(seconds)
        if wanted == self.timeout:
            return
        if self.pooled:  # kept by reaper for the statements that follow, not by the session
            self._conn.seconds, self.timeout = self._conn.default if seconds is None else seconds, wanted
            return
        self.timeout, self.statements = "?", self.statements + 1  # unknown until the server confirms it
        await (self._conn.execute("reset statement_timeout") if wanted is None
               else self._conn.execute(SET_TIMEOUT, wanted))
        self.timeout = wanted

    async def _run_tick(self, request: TickRequest) -> TickOutcome:
        before = self.statements
        rows: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, str] = {}
        every = {**request.batch, **{n: q.sql for n, q in (*request.solo.items(), *request.timed.items())}}
        if time.monotonic() >= self.described_until:  # now and then every metric is described anew, in one round
            # trip: the batch takes each one's columns by name, and a column added to a table a metric reads with
            # `*` would otherwise show only from the next connection on
            self.described_until = time.monotonic() + REDESCRIBE_SECONDS
            self.columns.clear()
        pending = {sql for sql in every.values() if sql not in self.columns}
        if pending:  # described in one round trip, with the source's other new batched metrics (combined.py);
            # when that fails, those due now each alone: a refused one fails alone
            new = pending | {sql for sql in request.universe.values() if sql not in self.columns}
            described, refused = await describe_all(self._conn, sorted(new), retry=pending)
            for sql, attributes in described.items():
                self._learn(sql, attributes)
            errors.update((name, self._why(refused[sql])) for name, sql in every.items() if sql in refused)
            self._say_repeats({name: sql for name, sql in every.items() if sql in described})
        unbatched = self.unbatched  # (metrics whose records asyncpg cannot read run alone: reaper.db.recordsafe)
        batch = {n: SoloQuery(sql) for n, sql in request.batch.items() if n not in errors and sql not in unbatched}
        solo = {**request.solo, **{n: SoloQuery(sql) for n, sql in request.batch.items() if sql in unbatched}}
        seconds: dict[str, float] = {}
        active: list[int] = []  # filled by the batch's statement when asked for
        groups: dict[float, dict[str, SoloQuery]] = {}  # one combined statement per distinct timeout
        for name, query in request.timed.items():
            if query.sql in unbatched:
                solo[name] = query
            elif name not in errors:
                groups.setdefault(query.statement_timeout_seconds or 0.0, {})[name] = query
        # the batch (None: the default timeout) and the timed groups, the session's current timeout first
        in_recovery: bool | None = None
        isolated = False
        ready: set[str] = set()  # metrics whose rows came out Go-ready (reaper.db.rows)
        cancelled: set[str] = set()  # timed groups cancelled by their timeout (TickOutcome.cancelled)
        # timed metrics alone (the slow lane's groups, reaper.daemon.jobs): no batch statement for an empty batch
        alone = request.timed and not request.batch and not request.count_active
        limits: list[float | None] = [*groups] if alone else [None, *groups]
        for limit in sorted(limits, key=lambda s: (timeout_ms(s) != self.timeout, s or 0.0)):
            if limit is None:
                self.members.update(request.universe, ((n, q.sql) for n, q in batch.items()),
                                    Batchable(self.columns, unbatched) if unbatched else self.columns)
                in_recovery, part_isolated = await self._run_combined(batch, None, rows, errors, seconds,
                                                                      active if request.count_active else None,
                                                                      go_ready=ready, members=self.members)
            else:
                _, part_isolated = await self._run_combined(groups[limit], limit, rows, errors, seconds,
                                                            go_ready=ready, cancelled=cancelled)
            isolated = isolated or part_isolated
        for name, query in solo.items():
            if name in errors:
                continue
            started = time.perf_counter()
            try:
                rows[name] = await self._run_solo(query, name)
            except READ_FAILURES as e:
                if is_connection_error(e):
                    raise
                errors[name] = self._why(e)
            seconds[name] = time.perf_counter() - started
        return TickOutcome(rows=rows, errors=errors, in_recovery=in_recovery, statements=self.statements - before,
                           isolated=isolated, seconds=seconds, active_backends=active[0] if active else None,
                           go_ready=frozenset(ready), cancelled=frozenset(cancelled))

    def _say_repeats(self, described: Mapping[str, str]) -> None:
        """A metric whose columns repeat a name (`select 1 as a, 2 as a`): a row holds one value per name, so the
        others never reached a sink, without a word. Said once per metric and connection."""
        for name, sql in described.items():
            if (names := repeated_names(self.columns.get(sql, ()))) and name not in self.said_repeats:
                self.said_repeats.add(name)
                log.warning("metric %s (database %s): its query names more than one column %s: only the last of "
                            "each reaches the sinks; give each column a name of its own", name, self.server.database,
                            names)

    def _learn(self, sql: str, attributes: Sequence[Any]) -> None:
        """A metric's columns, row shape and what the batch sends for it (reaper.db.recordsafe)."""
        self.columns[sql], self.shapes[sql] = describe(attributes)
        safe = record_safe_sql(sql, attributes, temporal=sql in self.as_text)
        if self.rewrites.get(sql) != safe:  # (a column added to a table read with `*`: the batch's text names it)
            if safe is None:
                self.rewrites.pop(sql, None)
            else:
                self.rewrites[sql] = safe
            self.members.reset()

    async def _run_combined(self, queries: Mapping[str, SoloQuery], limit: float | None,
                            rows: dict[str, list[dict[str, Any]]], errors: dict[str, str],
                            seconds: dict[str, float], active: list[int] | None = None, *,
                            go_ready: set[str] | None = None,
                            cancelled: set[str] | None = None,
                            members: Members | None = None) -> tuple[bool | None, bool]:
        """One combined statement for `queries` under the timeout `limit` (also reporting pg_is_in_recovery(),
        and the active backends into `active` when given); when it fails, each query alone, so the good ones
        are kept, except a timed group cancelled by its timeout: its names go to `cancelled` (each alone may
        take the timeout again: the caller decides). Each metric's server time goes to `seconds`. Returns
        (in recovery, isolated)."""
        conn = self._conn
        names = sorted(queries)
        sqls = {n: queries[n].sql for n in names}
        sent = members or Members.of(sqls, self.rewrites)  # the statement's members, due or not
        limit_rows = RowLimit.value
        listed, statement = sent.listed, sent.text(active is not None, READ_ONLY_GUARD, limit_rows)
        try:
            await self._use_timeout(limit)
            self.statements += 1
            record = await (conn.fetchrow(statement, sent.flags(queries)) if listed else conn.fetchrow(statement))
        except Exception as e:
            unreadable = is_decode_error(e) and not conn.is_closed()  # a value asyncpg misread: each alone below
            if not unreadable and (not isinstance(e, asyncpg.PostgresError) or is_connection_error(e)):
                raise
            if isinstance(e, asyncpg.PostgresError) and e.sqlstate[:2] in ("42", "3F"):  # a name gone: a dropped
                await self._read_extensions()  # extension's view or function? (the batch's members follow at once)
            gone_bad = (*sent.sqls.values(), *sqls.values())  # each described anew next time (a column gone)
            if members is not None:
                members.reset()  # a member gone bad (a dropped table) must not fail every tick: the set starts again
            if limit is not None and isinstance(e, asyncpg.QueryCanceledError):  # past its own timeout
                if len(names) > 1 and cancelled is not None:
                    cancelled.update(names)
                else:
                    errors.update({n: self._why(e) for n in names})
                return None, True
            for sql in gone_bad:
                self.columns.pop(sql, None)
            for name in names:
                started = time.perf_counter()
                try:
                    rows[name] = await self._run_solo(SoloQuery(sqls[name], queries[name].statement_timeout_seconds),
                                                      name)
                except READ_FAILURES as e2:
                    if is_connection_error(e2):
                        raise
                    errors[name] = self._why(e2)
                seconds[name] = time.perf_counter() - started
                if unreadable and name in rows:
                    await self._probe_records(name, sqls[name])
            return None, True
        clock = record[1]  # the clock before the next due member (reaper.db.combined)
        for i, name in enumerate(listed):
            if name not in sqls:
                continue
            sql, records = sqls[name], record[2 + 2 * i] or ()
            seconds[name], clock = max(0.0, record[3 + 2 * i] - clock), record[3 + 2 * i]
            if len(records) > limit_rows:
                errors[name] = str(TooManyRows(limit_rows))
                continue
            rows[name], ready = go_rows(self.columns[sql], self.shapes.get(sql), records)
            if ready and go_ready is not None:
                go_ready.add(name)
        if active is not None:
            active.append(int(record["active_backends"] or 0))
        if record["extmark"] != self.server.extensions_mark:  # an extension created or dropped since they were read
            await self._read_extensions()
        return bool(record[0]), False

    async def _run_solo(self, query: SoloQuery, name: str) -> list[dict[str, Any]]:
        await self._use_timeout(query.statement_timeout_seconds)
        sql = self.rewrites[query.sql] if query.sql in self.as_text else query.sql
        while True:
            self.statements += 1
            try:
                records = await self._conn.fetch(f"{read_only(sql)}\nlimit {RowLimit.value + 1}")
                break
            except Exception as e:  # a value Python cannot hold: as text, once (reaper.db.recordsafe)
                if not is_decode_error(e) or self._conn.is_closed():
                    raise
                sql = await self.send_as_text(name, query.sql, e)
        if len(records) > RowLimit.value:
            del records  # (the error's traceback keeps this frame: not its rows, until a full collection)
            raise TooManyRows(RowLimit.value)
        return [dict(r.items()) for r in records]

    async def refusals(self, sqls: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """`check --connect`'s refusals and repeated column names (reaper.db.describe.refused_sqls); one crossing."""
        return tuple(await crossing(refused_sqls, self._conn, sqls, self._why))

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """One query under the default timeout, rows as dicts (for set-up, special metrics and tools, not for ticks)."""
        records = await crossing(self._fetch, read_only(sql), *args)
        return [dict(r.items()) for r in records]

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        await self._use_timeout(None)
        self.statements += 1
        return list(await self._conn.fetch(sql, *args))

    async def create_extensions(self, names: Sequence[str]) -> dict[str, str | None]:
        """CREATE EXTENSION IF NOT EXISTS each name, in its own read-write transaction (the session is
        read-only by default). Returns name -> None on success, or the error. One crossing."""
        self.statements += 4 * len(names)  # (and the extensions read again: _read_extensions)
        result: dict[str, str | None] = await crossing(self._create_extensions, list(names))
        return result

    async def _create_extensions(self, names: list[str]) -> dict[str, str | None]:
        result: dict[str, str | None] = {}
        for name in names:
            try:
                async with self._conn.transaction():
                    # (created where the server's default would put it, not in the pinned path's pg_catalog)
                    await self._conn.execute("set transaction read write; set local search_path = public")
                    await self._conn.execute(f'create extension if not exists "{name}"')
                result[name] = None
            except asyncpg.PostgresError as e:
                if is_connection_error(e):
                    raise SourceUnavailable(describe_error(e)) from e
                result[name] = describe_error(e)
        await self._read_extensions()
        return result

    async def _read_extensions(self) -> None:
        """The server's extensions read again, the schemas of new ones added to the pinned search_path (after
        reaper's CREATE EXTENSION, or when the batch's statement says they changed: reaper.db.facts)."""
        pinned = self.server.search_path is not None
        self.statements += 1
        try:
            row = await self._conn.fetchrow(EXTENSIONS_SQL, pinned)
        except asyncpg.PostgresError as e:  # (not a metric's failure: the next tick tries again)
            if is_connection_error(e):
                raise
            log.debug("database %s: could not read the extensions again: %s", self.server.database, describe_error(e))
            return
        self.server = attrs.evolve(self.server, extensions=frozenset(row["exts"]), extensions_mark=row["extmark"],
                                   search_path=row["sp"] if pinned else None)

    async def execute(self, sql: str) -> None:
        """Run statements without results (tools and the demo's workload; never on a monitored source)."""
        await crossing(self._conn.execute, sql)

    def terminate(self) -> None:
        """Drop the connection at once (synchronous; always safe)."""
        if not self._conn.is_closed():
            self._conn.terminate()

    async def close(self) -> None:
        """Close politely within a shielded, bounded scope; terminate if that does not finish."""
        await close_or_terminate(self._conn.close, self.terminate)


async def close_or_terminate(close: Callable[[], Awaitable[Any]], terminate: Callable[[], None]) -> None:
    """Cleanup for every connection: a polite close (asyncio side) within CLOSE_GRACE_SECONDS, shielded
    from cancellation; the synchronous terminate() when that fails or does not finish."""
    with trio.move_on_after(CLOSE_GRACE_SECONDS, shield=True):
        try:
            await aio_as_trio(close)()
            return
        except Exception:
            pass
    terminate()


async def crossing(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Await an asyncio-side coroutine function from trio (one crossing, counted in AWAITED: its answer is
    read with the others that come soon after, reaper.db.aioloop); a broken connection becomes
    SourceUnavailable, anything else propagates as it is."""
    AWAITED.count += 1
    try:
        return await aio_as_trio(fn)(*args)
    except trio.Cancelled:
        raise
    except Exception as e:
        if is_connection_error(e):
            raise SourceUnavailable(describe_error(e)) from e
        raise
    finally:
        AWAITED.count -= 1


async def open_source_connection(dsn: str, *, statement_timeout_seconds: float,
                                 password_file: str | None = None,
                                 application_name: str = APPLICATION_NAME,
                                 read_only: bool = True, lock_timeout_seconds: float | None = None,
                                 search_path: Sequence[str] | None = ("public",)) -> SourceConnection:
    """Connect (read-only, our application_name, a server-side statement_timeout) and read server facts.

    `search_path`: the schemas for the metrics' unqualified names, pinned (PIN_SEARCH_PATH); None: the server's.
    The caller applies the connect deadline with a trio cancel scope.
    """
    kwargs = await connect_options(statement_timeout_seconds=statement_timeout_seconds,
                                   password_file=password_file, application_name=application_name,
                                   read_only=read_only, lock_timeout_seconds=lock_timeout_seconds,
                                   search_path=None if search_path is None else "pg_catalog")
    # one plan per backend for the batch's statement, whatever is due (reaper.db.combined); a source's few statements
    # stay prepared for the connection's life (asyncpg's default re-prepares each every 300 s, with a timer each)
    kwargs["server_settings"]["plan_cache_mode"], kwargs["max_cached_statement_lifetime"] = "force_generic_plan", 0
    try:
        return await aio_as_trio(_connect)(dsn, kwargs, statement_timeout_seconds, search_path)
    except trio.Cancelled:
        raise
    except Exception as e:
        if is_connection_error(e) or isinstance(e, asyncpg.PostgresError | ValueError):
            raise SourceUnavailable(describe_error(e)) from e
        raise


async def _connect(dsn: str, kwargs: dict[str, Any], timeout_seconds: float,
                   search_path: Sequence[str] | None) -> SourceConnection:
    conn, pooled = await pooler.connect(dsn, kwargs)
    tune(conn)
    pin = (PIN_SEARCH_PATH,) if search_path is not None and not pooled else ()
    args = (list(search_path),) if pin and search_path is not None else ()
    try:
        try:  # one statement when the role may read pg_control_system() (most can), two when not
            row = await _fetch_once(conn, "".join((SERVER_FACTS_SQL, *pin, f", {SYSTEM_ID_SQL} as sysid")), *args)
            sysid = None if row["sysid"] is None else str(row["sysid"])
        except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedFunctionError):
            row, sysid = await _fetch_once(conn, "".join((SERVER_FACTS_SQL, *pin)), *args), None
        if not pooled and pooler.settings_dropped(kwargs, row["st"]):  # a pooler that ignores them: again, pooled
            conn.terminate()
            pooler.remember(dsn)
            return await _connect(dsn, kwargs, timeout_seconds, search_path)
        addr = conn._addr
        # behind a pooler, reaper's own address says nothing of the server's: only where the server was reached
        local = ("127.0.0.1", "::1", "localhost") if not pooled else ()
        server = ServerInfo(
            version_num=row["num"], version=row["v"], in_recovery=row["rec"], database=row["db"],
            system_identifier=sysid, extensions=frozenset(row["exts"]),
            is_local=bool(row["via_socket"]) or _host_of(conn) in local or (pooled and row["lo"]),
            address=f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr),
            search_path=row["sp"] if pin else None,
            idle_session_timeout=row["ist"] if row["ist"] not in (None, "0") else None, started=row["pst"] or 0.0,
            extensions_mark=row["extmark"],
        )
    except BaseException:
        conn.terminate()
        raise
    return SourceConnection(pooler.Pooled(conn, timeout_seconds) if pooled else conn, server)


async def _fetch_once(conn: Any, sql: str, *args: Any) -> Any:
    """A row of a statement run once: outside asyncpg's cache, so it is not kept for the connection's life, and
    unnamed, so nothing of it stays in the server session (a pooler's next client may get that session)."""
    return await (await conn.prepare(sql, name=False)).fetchrow(*args)


def _host_of(conn: Any) -> str | None:
    addr = conn._addr  # asyncpg keeps the address it connected to
    if isinstance(addr, tuple):
        return str(addr[0])
    return None
