"""Listing an instance's databases, for `postgres-discovery` sources. Trio-flavoured, like reaper.db.

One short-lived asyncpg connection per listing (read-only, our application_name, a server-side
statement_timeout), one query, closed again: a refresh every couple of minutes does not justify a
connection kept open. Every failure becomes SourceUnavailable, so the caller keeps its last list.

The patterns are PostgreSQL regular expressions (POSIX ARE, `~`), evaluated by the server, exactly as
pgwatch's `include_pattern` / `exclude_pattern`: a pgwatch source carries over with the same
meaning. Unanchored, case-sensitive (`(?i)` or `^...$` work as in PostgreSQL). An empty or blank
pattern means "no filter".
"""

from __future__ import annotations

from typing import Any

import asyncpg
import attrs
import trio
from trio_asyncio import aio_as_trio

from reaper.db import APPLICATION_NAME, connect_options, describe_error, pooler
from reaper.errors import SourceUnavailable

# Every database that takes connections, is not a template, and that the role may CONNECT to.
# has_database_privilege by oid: a name would be looked up as given, fine too, but the oid cannot
# be misread whatever the database is called.
LIST_DATABASES_SQL = """select datname::text as datname
from pg_database
where not datistemplate
  and datallowconn
  and has_database_privilege(oid, 'CONNECT')
  and ($1::text is null or datname ~ $1::text)
  and ($2::text is null or datname !~ $2::text)
order by datname"""

# How many connections the server has room for now, read with the list (one round trip more, on the same
# short-lived connection): a discovery source's children take a connection each (two while a slow metric
# runs), and an instance with hundreds of databases would have its last slots taken by reaper: the
# children past the limit fail with "too many clients", and so do the applications' new connections.
ROOM_SQL = """select current_setting('max_connections')::int
         - current_setting('superuser_reserved_connections')::int
         - coalesce(current_setting('reserved_connections', true)::int, 0) as slots,
       count(*) filter (where client)::int as in_use,
       count(*) filter (where client and (application_name = $1 or application_name like $1 || ':%'))::int as ours,
       (select nullif(rolconnlimit, -1) from pg_roles where rolname = current_user) as role_limit,
       count(*) filter (where client and usename = current_user)::int as role_in_use
from (select pid <> pg_backend_pid() and coalesce(backend_type = 'client backend', true) as client,
             -- (a null backend_type: another role's session, its details not shown to this role)
             application_name, usename
      from pg_stat_activity) as a"""

INVALID_REGEX_SQLSTATE = "2201B"


@attrs.frozen
class Room:
    """The server's connection slots as a discovery listing found them (None behind a connection pooler)."""

    slots: int  # max_connections less the slots reserved for superusers (and, 16+, for pg_use_reserved_connections)
    in_use: int  # client backends now, reaper's own included
    ours: int  # reaper's (its application_name)
    role_limit: int | None  # the role's CONNECTION LIMIT
    role_in_use: int


@attrs.frozen
class Listing:
    names: list[str]
    room: Room | None = None
CLOSE_TIMEOUT_SECONDS = 2.0


def _pattern(value: str | None) -> str | None:
    return value if value is not None and value.strip() else None


async def list_databases(dsn: str, *, include_pattern: str | None = None, exclude_pattern: str | None = None,
                         password_file: str | None = None, statement_timeout_seconds: float = 30.0) -> Listing:
    """The names of the databases a discovery source should monitor, sorted, and the server's room.

    The caller bounds the whole call with a trio cancel scope (connect + query). Raises
    SourceUnavailable for every failure: unreachable, refused, a bad dsn, an invalid pattern.
    """
    kwargs = await connect_options(statement_timeout_seconds=statement_timeout_seconds,
                                   password_file=password_file, statement_cache_size=0,
                                   search_path="pg_catalog")  # (its query reads the catalog only)
    try:
        return await aio_as_trio(_list)(dsn, kwargs, _pattern(include_pattern), _pattern(exclude_pattern))
    except trio.Cancelled:
        raise
    except asyncpg.PostgresError as e:
        if getattr(e, "sqlstate", None) == INVALID_REGEX_SQLSTATE:
            raise SourceUnavailable(f"include_pattern/exclude_pattern: {describe_error(e)}") from e
        raise SourceUnavailable(f"listing databases failed: {describe_error(e)}") from e
    except (OSError, ValueError, asyncpg.InterfaceError, TimeoutError, ConnectionError, EOFError) as e:
        raise SourceUnavailable(f"listing databases failed: {describe_error(e)}") from e


async def _list(dsn: str, kwargs: dict[str, Any], include: str | None, exclude: str | None) -> Listing:
    conn, pooled = await pooler.connect(dsn, kwargs)  # (a pooler: its wildcard database lists the server's)
    try:
        rows = await conn.fetch(LIST_DATABASES_SQL, include, exclude)
        room = None if pooled else Room(**dict(await conn.fetchrow(ROOM_SQL, APPLICATION_NAME)))
    except BaseException:
        conn.terminate()
        raise
    try:
        await conn.close(timeout=CLOSE_TIMEOUT_SECONDS)  # a polite Terminate: no "unexpected EOF" in the server log
    except Exception:
        conn.terminate()
    return Listing([str(r["datname"]) for r in rows], room)
