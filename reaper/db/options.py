"""The keyword arguments of asyncpg.connect that every reaper connection shares (reaper.db.connect_options)."""

from __future__ import annotations

from typing import Any

import trio

from reaper.db.failures import describe_error
from reaper.errors import SourceUnavailable

APPLICATION_NAME = "reaper"


async def _read_password_file(path: str) -> str:
    text = await (await trio.Path(path).expanduser()).read_text()
    return text.strip()


# asyncpg's per-connection LRU of prepared statements (each entry: the text, its row description and codecs).
# A source's connection produces few distinct texts: one combined statement per distinct set of due metrics,
# one per distinct timeout group, one per degraded metric run alone, and the slow lane's few specials' reads.
# reaper lifts asyncpg's size limit on cached texts (max_cacheable_statement_size, 15 KiB by default): a big
# preset's combined statement was otherwise prepared, sent whole and planned by the server every tick. The
# shipped presets' distinct sets (basic 2, standard 9, exhaustive 11, full 34 in a week; tests/test_memory.py
# counts them): 40 holds them all with margin; 200 (what reaper asked for) held memory.
STATEMENT_CACHE_SIZE = 40


async def connect_options(*, statement_timeout_seconds: float, password_file: str | None,
                          application_name: str = APPLICATION_NAME, read_only: bool = True,
                          statement_cache_size: int = STATEMENT_CACHE_SIZE,
                          lock_timeout_seconds: float | None = None,
                          search_path: str | None = None) -> dict[str, Any]:
    """asyncpg.connect keyword arguments for every reaper connection: who we are, read-only by default,
    a server-side statement_timeout, no JIT for small catalog queries, the password_file's password, a
    statement cache bounded to what a source produces (STATEMENT_CACHE_SIZE)."""
    options: dict[str, Any] = {
        "server_settings": {
            "application_name": application_name,
            "default_transaction_read_only": "on" if read_only else "off",
            "statement_timeout": str(int(statement_timeout_seconds * 1000)),
            "jit": "off",
            # a database or role may default to serializable: on a hot standby every query then fails ("cannot use
            # serializable mode in a hot standby"), on a primary it takes predicate locks; reaper's reads need neither
            "default_transaction_isolation": "read committed",
        },
        "statement_cache_size": statement_cache_size,
        # a big preset's combined statement is far over asyncpg's 15 KiB default: uncached, it was parsed, sent
        # whole and planned by the server every tick
        "max_cacheable_statement_size": 0,
    }
    if lock_timeout_seconds is not None:  # (0: off; else whole milliseconds, at least one)
        options["server_settings"]["lock_timeout"] = str(max(1, round(lock_timeout_seconds * 1000))
                                                         if lock_timeout_seconds > 0 else 0)
    if search_path is not None:  # a client's startup setting outranks the database's and the role's own
        options["server_settings"]["search_path"] = search_path
    if password_file:
        try:
            options["password"] = await _read_password_file(password_file)
        except OSError as e:
            raise SourceUnavailable(f"cannot read password_file {password_file}: {describe_error(e)}") from e
    return options
