"""The fleet's coordination session: one asyncpg connection per member to the coordination database.
Trio-flavoured, like reaper.db; the ownership logic lives in reaper.daemon.fleet.

PostgreSQL's session-level advisory locks are the arbiter; nothing is written to any table:

- a member is live while its session holds the two-key advisory lock (MEMBER_CLASS, member id)
  (`pg_try_advisory_lock(int4, int4)`: `objsubid = 2` in pg_locks). A member that dies loses its
  session, and the server drops its locks with it: no heartbeat table, nothing to clean up.
- a member owns a source while its session holds the one-key advisory lock keyed by the source's key
  (`source_key`: the first 8 bytes of blake2b of the name, a signed 64-bit integer; `objsubid = 1`).
  Two names with the same key (a collision: about one chance in 10^19 for a pair) are owned together.
  Another application taking one-key advisory locks in the same database could collide with a source's
  key: give the fleet a database (or the config database) where nobody else does.

The member list is read from pg_locks, joined with pg_stat_activity for each member's name (its
coordination session's application_name is `reaper-fleet:<member>`; other roles' sessions show it too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import asyncpg
import attrs
import trio
from trio_asyncio import aio_as_trio

from reaper.db import close_or_terminate, connect_options, crossing, describe_error, is_connection_error, tls
from reaper.errors import SourceUnavailable

MEMBER_CLASS = 0x52504552  # 'RPER': the first key of every member lock (fits a positive int4)
FLEET_APPLICATION_PREFIX = "reaper-fleet:"

LOCKS_SQL = """select l.pid, l.objsubid::int as subid, l.classid::int8 as hi, l.objid::int8 as lo,
       a.application_name::text as app
from pg_locks l left join pg_stat_activity a on a.pid = l.pid
where l.locktype = 'advisory' and l.granted
  and l.database = (select oid from pg_database where datname = current_database())"""


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


def source_key(name: str) -> int:
    """The source's advisory lock key: stable across processes, versions and machines."""
    return _digest(name)


def member_id(name: str) -> int:
    """The member's second lock key (a positive int4): two names with the same id cannot both be live."""
    return _digest("member:" + name) & 0x7FFFFFFF


@attrs.frozen
class LiveMember:
    id: int
    name: str  # from its application_name ("" when not visible)
    pid: int  # its coordination session's server pid
    source_keys: frozenset[int]  # the source locks its session holds


class FleetSession:
    """One member's coordination session: it holds the member lock for as long as it is open."""

    def __init__(self, conn: Any, member: str) -> None:
        self._conn = conn
        self.member = member
        self.id = member_id(member)
        self.pid: int = conn.get_server_pid()

    def __repr__(self) -> str:
        return f"<FleetSession {self.member} id={self.id} pid={self.pid}>"

    async def members(self) -> list[LiveMember]:
        """The live members (this one too) and the source locks each one holds, in one query."""
        rows = await crossing(self._conn.fetch, LOCKS_SQL)
        names: dict[int, tuple[int, str]] = {}
        held: dict[int, set[int]] = {}
        for r in rows:
            if r["subid"] == 2 and r["hi"] == MEMBER_CLASS:
                app = r["app"] or ""
                names[r["pid"]] = (r["lo"], app.removeprefix(FLEET_APPLICATION_PREFIX))
            elif r["subid"] == 1:
                key = ((r["hi"] << 32) | r["lo"]) & 0xFFFFFFFFFFFFFFFF
                held.setdefault(r["pid"], set()).add(key - (1 << 64) if key >= 1 << 63 else key)
        return [LiveMember(id=mid, name=name, pid=pid, source_keys=frozenset(held.get(pid, ())))
                for pid, (mid, name) in sorted(names.items())]

    async def try_claim(self, keys: Iterable[int]) -> set[int]:
        """pg_try_advisory_lock each key (never waits); the keys now held by this session."""
        wanted = sorted(set(keys))
        if not wanted:
            return set()
        rows = await crossing(self._conn.fetch,
                              "select k, pg_try_advisory_lock(k) as ok from unnest($1::int8[]) as k", wanted)
        return {r["k"] for r in rows if r["ok"]}

    async def release(self, keys: Iterable[int]) -> None:
        """Unlock source keys this session holds (its sources are stopped already)."""
        wanted = sorted(set(keys))
        if wanted:
            await crossing(self._conn.fetch, "select pg_advisory_unlock(k) from unnest($1::int8[]) as k", wanted)

    async def close(self) -> None:
        """End the session: the server drops every lock it held (the member leaves the fleet)."""
        await close_or_terminate(self._conn.close, self.terminate)

    def lost(self) -> bool:
        """The connection is closed (the server went away): its locks are gone."""
        return bool(self._conn.is_closed())

    def terminate(self) -> None:
        if not self._conn.is_closed():
            self._conn.terminate()


async def open_fleet_session(dsn: str, member: str, *, password_file: str | None = None,
                             statement_timeout_seconds: float = 10.0) -> FleetSession:
    """Connect to the coordination database and take this member's lock. The caller bounds it with a
    cancel scope. SourceUnavailable when unreachable, or when a live member holds the same member lock
    (the same member name: each process needs its own)."""
    kwargs = await connect_options(statement_timeout_seconds=statement_timeout_seconds,
                                   password_file=password_file,
                                   application_name=(FLEET_APPLICATION_PREFIX + member)[:63],
                                   statement_cache_size=0)
    try:
        conn = await aio_as_trio(tls.connect)(dsn, kwargs)
    except trio.Cancelled:
        raise
    except Exception as e:
        if is_connection_error(e) or isinstance(e, asyncpg.PostgresError | ValueError):
            raise SourceUnavailable(f"fleet coordination database: {describe_error(e)}") from e
        raise
    session = FleetSession(conn, member)
    try:
        ok = await crossing(conn.fetchval, "select pg_try_advisory_lock($1::int4, $2::int4)", MEMBER_CLASS,
                            session.id)
    except BaseException:
        session.terminate()
        raise
    if not ok:
        await session.close()
        raise SourceUnavailable(f"fleet member {member!r} is live already (another process with the same "
                                f"member name, or a name with the same member id {session.id})")
    return session
