"""Sources reached through a connection pooler (PgBouncer, or any middleman that hands out server sessions).

reaper asks each connection for settings in its startup packet (read-only transactions, a statement_timeout,
no JIT, generic plans), changes a metric's statement_timeout as a session setting, and keeps its statements
prepared for the connection's life. A pooler breaks all three: PgBouncer refuses startup settings it does not
track ("unsupported startup parameter": the source was down for ever), or drops them when its
`ignore_startup_parameters` lists them; in transaction pooling the next transaction may run in another server
session, where reaper's prepared statements do not exist ("prepared statement ... does not exist", every few
ticks), and a session setting reaper made stays behind for the pooler's other clients.

So a connection that meets a pooler (the refusal, or the statement_timeout it asked for not in force) is made
again, *pooled*: only application_name at startup, no named prepared statements (asyncpg's statement cache
off: its unnamed statements are parsed and run in one exchange), and no session state, ever. Statement
timeouts are then kept by reaper itself: a statement past its timeout is cancelled with a cancel request
(the pooler forwards it to the server session running it) and fails as the server's own timeout would
(QueryCanceledError). Every statement still makes its own transaction read-only (reaper.db.READ_ONLY_GUARD).
A DSN found pooled is remembered for the process's life, so its reconnects go pooled at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from reaper.db import tls
from reaper.db.failures import POOLER_REFUSAL as REFUSAL

STARTUP_KEPT = frozenset({"application_name"})  # what every pooler passes on (PgBouncer tracks it)
MEMORY_DSNS = 10_000  # DSNs remembered as pooled, the most recent kept

_pooled: dict[str, None] = {}  # DSNs found behind a pooler, oldest first


def refused(e: BaseException) -> bool:
    """Did a pooler refuse the startup settings (and nothing else was wrong)?"""
    return isinstance(e, asyncpg.PostgresError) and REFUSAL in str(e)


def settings_dropped(asked: dict[str, Any], statement_timeout_ms: str | None) -> bool:
    """Is the statement_timeout asked for at startup not the session's? Only a middleman drops it: the
    server gives a client's startup settings precedence over every role or database default."""
    wanted = asked.get("server_settings", {}).get("statement_timeout")
    return wanted is not None and statement_timeout_ms is not None and statement_timeout_ms != wanted


def remember(dsn: str) -> None:
    _pooled.pop(dsn, None)
    _pooled[dsn] = None
    while len(_pooled) > MEMORY_DSNS:
        del _pooled[next(iter(_pooled))]


def known(dsn: str) -> bool:
    return dsn in _pooled


def pooled_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The connect options for a pooled connection: the same, less every startup setting a pooler may refuse
    and less the statement cache."""
    settings = {k: v for k, v in kwargs.get("server_settings", {}).items() if k in STARTUP_KEPT}
    return {**kwargs, "server_settings": settings, "statement_cache_size": 0}


async def connect(dsn: str, kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """(asyncpg connection, pooled?) (asyncio side): pooled at once for a DSN known to be, else as asked, and
    pooled when the startup settings are refused."""
    if known(dsn):
        return await tls.connect(dsn, pooled_options(kwargs)), True
    try:
        return await tls.connect(dsn, kwargs), False
    except asyncpg.PostgresError as e:
        if not refused(e):
            raise
    remember(dsn)
    return await tls.connect(dsn, pooled_options(kwargs)), True


class Pooled:
    """An asyncpg connection behind a pooler, each statement under the timeout reaper keeps for it (`seconds`;
    0 or None: none). Past it, asyncpg cancels the statement on the server (a cancel request) and the call
    fails with QueryCanceledError, as under the server's statement_timeout. Everything else is the connection's."""

    def __init__(self, conn: Any, seconds: float | None) -> None:
        self._conn = conn
        self.default = seconds  # the connect-time statement_timeout
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def _timed(self, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        seconds = self.seconds
        try:
            return await call(*args, timeout=seconds or None)
        except TimeoutError:
            if not seconds or self._conn.is_closed():
                raise
            raise asyncpg.QueryCanceledError(
                f"canceling statement due to statement timeout ({seconds:g}s, kept by reaper: a connection "
                "pooler is in between)") from None

    async def fetch(self, sql: str, *args: Any) -> Any:
        return await self._timed(self._conn.fetch, sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._timed(self._conn.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._timed(self._conn.fetchval, sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        return await self._timed(self._conn.execute, sql, *args)

    async def prepare(self, sql: str) -> Any:
        return await self._timed(self._conn.prepare, sql)
