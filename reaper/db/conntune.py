"""What reaper sets on every asyncpg connection to a monitored server, right after it opens."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, NoReturn

log = logging.getLogger("reaper.db")

# Bytes asked of the socket per recv: asyncio's default is 256 KiB, and each recv allocates that much
# before the bytes object shrinks to what arrived. 32 KiB needs no more reads than 256 KiB for 6 debug
# sources' ticks (measured: ~5 reads a tick either way; 16 KiB needs 30% more).
RECV_BYTES = 32 * 1024


# pg_type's rows for record and record[] as asyncpg's type introspection reads them (the same in every PostgreSQL:
# system OIDs are fixed). A tick's statement returns each metric's rows as a record[], for which asyncpg has no
# built-in codec: without these, every new connection introspected it at its first tick, in three round trips
# (jit off, the introspection query, jit back) and a server-side query on pg_type.
RECORD_TYPES = (
    {"oid": 2249, "ns": "pg_catalog", "name": "record", "kind": b"p", "basetype": None, "elemtype": 0,
     "elemdelim": None, "range_subtype": None, "attrtypoids": None, "attrnames": None, "depth": 1,
     "basetype_name": None, "elemtype_name": "-", "range_subtype_name": None},
    {"oid": 2287, "ns": "pg_catalog", "name": "_record", "kind": b"p", "basetype": None, "elemtype": 2249,
     "elemdelim": b",", "range_subtype": None, "attrtypoids": None, "attrnames": None, "depth": 0,
     "basetype_name": None, "elemtype_name": "record", "range_subtype_name": None},
)


def known_record_arrays(conn: Any) -> None:
    """Give the connection asyncpg's codec for record[] without a round trip (RECORD_TYPES). asyncpg's
    protocol settings are not public API: on any surprise, asyncpg introspects the type itself as before."""
    try:
        conn._protocol.get_settings().register_data_types(RECORD_TYPES)
    except Exception:  # an asyncpg without this internal: its own introspection still works
        log.debug("record[] codec not pre-registered; asyncpg introspects it", exc_info=True)


def small_reads(conn: Any) -> None:
    """Read the connection's socket RECV_BYTES at a time (asyncio's selector transport's `max_size`)."""
    transport = getattr(conn, "_transport", None)  # asyncpg keeps the asyncio transport it reads from
    if transport is not None and getattr(transport, "max_size", 0) > RECV_BYTES:
        transport.max_size = RECV_BYTES


class _NoCallbacks(frozenset[Any]):
    """The one empty, shared listener set of every source connection: reaper registers no log, query or
    termination listener, and asyncpg only clears, discards and iterates these (an empty set is 216 bytes,
    three a connection). An `add` would be a new use of asyncpg's API in reaper: it fails loudly."""

    def clear(self) -> None:
        pass

    def discard(self, item: Any) -> None:
        pass

    def add(self, item: Any) -> NoReturn:
        raise RuntimeError("reaper.db.conntune.slim shared this asyncpg listener set: register no listener")


NO_CALLBACKS = _NoCallbacks()
UNUSED_LISTENERS = ("_log_listeners", "_query_loggers", "_termination_listeners")


def slim(conn: Any) -> None:
    """Leave out what a connection holds empty and never uses (~1.3 KB of its ~50): the listener sets
    (NO_CALLBACKS), and the deque (a 600-byte block) behind its protocol's `writing_allowed` event, which only
    waits while the socket's send buffer is full: a list does what asyncio.Event asks of it (append,
    remove, iterate). Only what looks exactly as expected is touched."""
    for name in UNUSED_LISTENERS:
        if type(getattr(conn, name, None)) is set and not getattr(conn, name):
            setattr(conn, name, NO_CALLBACKS)
    event = getattr(getattr(conn, "_protocol", None), "writing_allowed", None)
    waiters = getattr(event, "_waiters", None)
    if type(event) is asyncio.Event and type(waiters) is collections.deque and not waiters:
        event._waiters = []  # type: ignore[assignment]


def tune(conn: Any) -> None:
    small_reads(conn)
    known_record_arrays(conn)
    slim(conn)
