"""What an asyncpg error means: a broken connection (the source is down) or a statement's failure; and its one
line for an operator."""

from __future__ import annotations

import asyncio

import asyncpg

from reaper.config.redact import scrub


def is_connection_error(exc: BaseException) -> bool:
    """Errors that mean the connection (not the query) is broken; asyncpg's InternalClientError too: its protocol
    is confused, e.g. by a server's FATAL message (a forced drop database) read while the connection was idle."""
    if isinstance(exc, asyncpg.UnsupportedClientFeatureError):  # a column type asyncpg cannot read: the metric's
        return False
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError | asyncpg.InternalClientError
                  | OSError | asyncio.TimeoutError | ConnectionError | EOFError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        # 08: connection exception; 57P0x: admin/crash shutdown, cannot connect now; 28: auth; 3D000: no db
        return state.startswith(("08", "57P0", "28")) or state == "3D000"
    return False


POOLER_REFUSAL = "unsupported startup parameter"  # PgBouncer's answer to a setting it does not track


def describe_error(exc: BaseException) -> str:
    """One line for an operator: no traceback, no password."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if POOLER_REFUSAL in message:  # (sources go on pooled, reaper.db.pooler; a storage cannot)
            message += (": a connection pooler (PgBouncer) is in between; point this dsn at the server itself, or "
                        "give the pooler pool_mode = session and that parameter in ignore_startup_parameters")
        return scrub(f"{message} (SQLSTATE {state})" if state else message)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else ""
    return scrub(text) or exc.__class__.__name__


# undefined table, function (or operator), object (a type), schema: a name the pinned search_path did not find
UNRESOLVED_NAME = frozenset({"42P01", "42883", "42704", "3F000"})


def unresolved_hint(exc: BaseException, search_path: str | None) -> str:
    """What to do when a metric's name is not found in the search_path reaper pinned (reaper.db.facts)."""
    if search_path is None or getattr(exc, "sqlstate", None) not in UNRESOLVED_NAME:
        return ""
    return (f"; reaper's session looks up unqualified names in search_path = {search_path}: qualify the name,"
            " or add its schema to the source's search_path")
