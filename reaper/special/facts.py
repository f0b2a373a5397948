"""The few server facts the special metrics need, read once per connection (issue 14).

The OS metrics need the data directory, the log directory, the tablespaces and whether the connection
is a unix socket; the server log metric needs the logging settings and which file-reading functions
the role may execute. All of it is ONE statement (`FACTS_SQL`), read the first time a special needs it
on a connection (for a source with OS metrics, as soon as its slow lane opens one: `prime_facts`, so
that a slow metric taking the new connection first cannot keep them waiting) and kept for the life of
that connection, shared by every special metric of the source, and read again after FACTS_SECONDS (a
reloaded log_directory or a new tablespace is noticed within that; not while a local collector's lease
finds the connection busy with a slow-lane statement) or on a new connection.

"The connection" is known by its ServerInfo object (`link.server`): reaper.db makes one per connection,
and a local collector's leased link hands out the slow lane's. A failed read is not kept (the next run
tries again).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from typing import Any

import attrs
import trio

from reaper.db import ServerInfo
from reaper.db.link import SourceLink
from reaper.errors import MetricError, SourceUnavailable
from reaper.special import SpecialContext

FACTS_SECONDS = 600.0

FACTS_SQL = """select inet_server_addr() is null as via_socket,
  current_setting('data_directory') as data_directory,
  current_setting('log_directory') as log_directory,
  current_setting('logging_collector') as logging_collector,
  current_setting('log_destination') as log_destination,
  current_user::text as role,
  has_function_privilege('pg_catalog.pg_read_binary_file(text, bigint, bigint)', 'EXECUTE') as can_read_binary,
  has_function_privilege('pg_catalog.pg_read_file(text, bigint, bigint)', 'EXECUTE') as can_read_text,
  (select coalesce(json_agg(json_build_array(spcname::text, pg_tablespace_location(oid)) order by spcname), '[]')
     from pg_tablespace where pg_tablespace_location(oid) <> '')::text as tablespaces"""


@attrs.frozen
class ServerFacts:
    via_socket: bool
    data_directory: str
    log_directory: str  # the setting: relative to the data directory, or absolute
    logging_collector: str
    log_destination: str
    role: str
    can_read_binary: bool
    can_read_text: bool
    tablespaces: tuple[tuple[str, str], ...]  # (name, location), by name

    @property
    def log_path(self) -> str:
        """The log directory as an absolute path."""
        return os.path.join(self.data_directory, self.log_directory)


@attrs.frozen
class _Kept:
    server: Callable[[], ServerInfo | None]  # the connection they were read on (a weak reference)
    read_at: float
    facts: ServerFacts


_KEPT: dict[int, _Kept] = {}  # id(ServerInfo of the connection) -> facts

def _ref(server: ServerInfo) -> Callable[[], ServerInfo | None]:
    try:
        return weakref.ref(server)
    except TypeError:  # a ServerInfo without a weakref slot: keep it (one small object per connection)
        return lambda: server


def _server_of(link: Any) -> ServerInfo | None:
    try:
        server: ServerInfo = link.server
    except SourceUnavailable:  # a leased link whose connection is not open yet
        return None
    return server


def _kept(server: ServerInfo | None, now: float, *, busy: bool = False) -> ServerFacts | None:
    """The facts kept for this connection, if read less than FACTS_SECONDS ago, or at any time while the
    connection is `busy`: a local collector's lease waits for the slow lane's lock, held for as long as a
    slow metric's statement runs; the facts of ten minutes ago beat failing at the collector's deadline."""
    if server is None:
        return None
    kept = _KEPT.get(id(server))
    if kept is None or kept.server() is not server or (now - kept.read_at >= FACTS_SECONDS and not busy):
        return None
    return kept.facts


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def _parse(row: dict[str, Any]) -> ServerFacts:
    spaces = row["tablespaces"]
    pairs = json.loads(spaces) if isinstance(spaces, str | bytes) else (spaces or [])
    return ServerFacts(
        via_socket=bool(row["via_socket"]), data_directory=str(row["data_directory"]),
        log_directory=str(row["log_directory"]), logging_collector=str(row["logging_collector"]),
        log_destination=str(row["log_destination"]), role=str(row["role"]),
        can_read_binary=bool(row["can_read_binary"]), can_read_text=bool(row["can_read_text"]),
        tablespaces=tuple((str(name), str(location)) for name, location in pairs))


async def server_facts(ctx: SpecialContext) -> ServerFacts:
    """This connection's facts: kept ones when read on it less than FACTS_SECONDS ago, else read now.

    Raises MetricError (for ctx.metric) when the role may not read the settings.
    """
    ready = getattr(ctx.conn, "ready", None)  # a local collector's lease: the slow lane's connection, once open
    if ready is not None:
        await ready()
    facts = _kept(_server_of(ctx.conn), trio.current_time(), busy=bool(getattr(ctx.conn, "busy", False)))
    if facts is not None:
        return facts
    try:
        return await _read(ctx.conn)
    except Exception as e:
        if _sqlstate(e) is None:
            raise
        raise MetricError(ctx.metric.name, f"cannot read the server's settings (data_directory, log_directory, "
                                           f"logging) ({e}); the monitoring role needs pg_monitor or "
                                           "pg_read_all_settings") from e


async def prime_facts(link: SourceLink, seconds: float) -> None:
    """Read the facts on a connection the slow lane has just opened, before any statement can take it.

    A local collector reaches the server over the slow lane's connection and waits for its lock; if a
    slow metric took the new connection first, the collector's first read waited behind that statement
    and failed at its deadline. Read here, they are kept before any job runs. A read the role may not
    make is left to the collectors (each reports it as its own error); a server that does not answer
    within `seconds` leaves the connection in an unknown state, so it is closed (SourceUnavailable).
    """
    with trio.move_on_after(seconds) as scope:
        try:
            await _read(link)
        except Exception as e:
            if _sqlstate(e) is None and not isinstance(e, SourceUnavailable):
                raise
    if scope.cancelled_caught:
        link.terminate()
        raise SourceUnavailable(f"the server did not answer a read of its settings within {seconds:g}s")


async def _read(conn: Any) -> ServerFacts:
    rows = await conn.fetch(FACTS_SQL)
    now = trio.current_time()
    facts = _parse(dict(rows[0]))
    server = _server_of(conn)
    if server is not None:
        for key in [k for k, kept in _KEPT.items() if kept.server() is None]:
            del _KEPT[key]  # connections that are gone
        _KEPT[id(server)] = _Kept(_ref(server), now, facts)
    return facts


def forget() -> None:
    """Drop every kept fact (tests)."""
    _KEPT.clear()
