"""Source kinds that stand for several servers or databases: turning them into concrete sources.

Pure trio (no asyncio here): `resolve(source)` returns the concrete `postgres` sources a
discovery-type source stands for, now. The caller refreshes every `discovery_interval_seconds`
(and on reload), starts and stops the children's tasks by name, and keeps the last known list when
`resolve` raises SourceUnavailable.

postgres-discovery
    The dsn names one database of an instance; every database that allows connections, is not a
    template, that the role may CONNECT to, matches `include_pattern` and does not match
    `exclude_pattern` becomes a child named `<source>_<datname>` whose dsn is the source's with the
    database replaced (percent-encoded: any database name works). The patterns are PostgreSQL
    regular expressions evaluated by the server (as pgwatch's): see reaper.db.discovery.

patroni
    The members of a Patroni cluster, read from etcd: see reaper.kinds.patroni (imported, with httpx,
    only when a patroni source is configured).

Every child inherits the rest of the source: preset, metrics, standby preset/metrics, tags, group,
timeouts, password_file, only_if_primary.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Sequence

import attrs
import trio

from reaper.config.rules import DSN_EXPECTED
from reaper.config.schema import SourceConfig
from reaper.db.discovery import Room, list_databases
from reaper.errors import SourceUnavailable
from reaper.kinds.dsn import database_child, with_database, with_parameters

__all__ = ["DISCOVERY_KINDS", "POOLER_KINDS", "check_source", "database_child", "is_discovery", "resolve",
           "to_resolve", "wanted", "with_database", "with_parameters"]

log = logging.getLogger("reaper.kinds")

DISCOVERY_KINDS = frozenset({"postgres-discovery", "patroni"})
POOLER_KINDS = frozenset({"pgbouncer", "pgpool"})
RESOLVE_GRACE_SECONDS = 5.0


def is_discovery(source: SourceConfig) -> bool:
    """True for kinds that `resolve` expands into children (their own task never collects)."""
    return source.kind in DISCOVERY_KINDS


def to_resolve(sources: Sequence[SourceConfig], asked: Collection[str]) -> list[SourceConfig]:
    """The configured sources a one-off command (`reaper once`, `check --connect`) resolves for the names asked:
    every enabled one when none; else those named, and every enabled discovery source while a name is not
    configured (it may be a database one finds). Keep a child with `wanted`."""
    if not asked:
        return [s for s in sources if s.enabled]
    unknown = set(asked) - {s.name for s in sources}
    return [s for s in sources if s.name in asked or (unknown and s.enabled and is_discovery(s))]


def wanted(parent: str, child: SourceConfig, asked: Collection[str]) -> bool:
    """Whether a resolved child is one the names asked for (its own name, or its configured source's)."""
    return not asked or parent in asked or child.name in asked


async def resolve(source: SourceConfig) -> list[SourceConfig]:
    """The concrete sources `source` stands for now (itself, for a concrete kind), sorted by name.

    Raises SourceUnavailable when the list cannot be had (the caller keeps its last known list).
    The whole call is bounded by the source's connect + query timeouts (plus a little grace).
    """
    if source.kind == "postgres-discovery":
        return await _discover(source)
    if source.kind == "patroni":
        from reaper.kinds.patroni import parse_etcd_dsn, patroni_children, read_etcd_members  # httpx: only when used

        try:
            target = parse_etcd_dsn(source.dsn)
        except ValueError as e:
            raise SourceUnavailable(f"dsn: {e}") from e
        members = await read_etcd_members(target, request_seconds=source.connect_timeout_seconds)
        children = patroni_children(source, target, members)
        if not (_has_pattern(source.include_pattern) or _has_pattern(source.exclude_pattern)):
            return children
        return await _discover_members(source, children)
    return [source]


def _has_pattern(pattern: str | None) -> bool:
    return bool(pattern and pattern.strip())


async def _discover(source: SourceConfig) -> list[SourceConfig]:
    deadline = source.connect_timeout_seconds + source.query_timeout_seconds + RESOLVE_GRACE_SECONDS
    try:
        with trio.fail_after(deadline):
            listing = await list_databases(
                source.dsn, include_pattern=source.include_pattern, exclude_pattern=source.exclude_pattern,
                password_file=source.password_file, statement_timeout_seconds=source.query_timeout_seconds)
    except trio.TooSlowError:
        raise SourceUnavailable(f"listing databases timed out after {deadline:g}s") from None
    if listing.room is not None:
        say_room(source.name, len(listing.names), listing.room)
    return sorted((database_child(source, name) for name in listing.names), key=lambda s: s.name)


_crowded: dict[str, int] = {}  # discovery source -> the number of databases it was last warned about


def say_room(source: str, databases: int, room: Room) -> None:
    """Warn, once per source and number of databases, when collecting them would take more connections than
    the server (or the role's CONNECTION LIMIT) has room for: those past the limit fail with "too many
    clients", and the server's other clients' new connections are refused as well."""
    new = max(0, databases - room.ours)  # reaper's children already connected are in use already
    problems = []
    if new > room.slots - room.in_use:
        problems.append(f"the server has {max(0, room.slots - room.in_use)} of its {room.slots} connection slots "
                        f"free (max_connections less the reserved ones; {room.ours} of the {room.in_use} in use "
                        "are reaper's)")
    others = max(0, room.role_in_use - room.ours)  # the role's sessions that are not reaper's
    if room.role_limit is not None and databases + others > room.role_limit:
        problems.append(f"the role's CONNECTION LIMIT is {room.role_limit}"
                        + (f" ({others} of its sessions are not reaper's)" if others else ""))
    if not problems:
        _crowded.pop(source, None)
        return
    if _crowded.get(source) == databases:
        return
    _crowded[source] = databases
    log.warning("source %s: %d databases to collect take %d connections or more (one each, two while a slow "
                "metric runs), and %s: those past the limit will fail with \"too many clients\", and so may other "
                "clients of the server; narrow include_pattern or raise the limit", source, databases, databases,
                " and ".join(problems))


async def _discover_members(source: SourceConfig, members: list[SourceConfig]) -> list[SourceConfig]:
    """A patroni source with include/exclude patterns: each member's databases, as pgwatch does
    (`<source>[_<scope>]_<member>_<datname>`). A member whose listing fails is left out (logged):
    during a failover one member is often down, and the others must still be followed."""
    found: dict[str, list[SourceConfig]] = {}

    async def one(member: SourceConfig) -> None:
        as_discovery = attrs.evolve(member, kind="postgres-discovery", include_pattern=source.include_pattern,
                                    exclude_pattern=source.exclude_pattern)
        try:
            found[member.name] = await _discover(as_discovery)
        except SourceUnavailable as e:
            log.warning("source %s: member %s left out of this refresh: %s", source.name, member.name, e)

    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(one, member)
    return sorted((child for children in found.values() for child in children), key=lambda s: s.name)


def check_source(source: SourceConfig) -> list[str]:
    """Kind-specific problems with a source's settings, as `key: what is wrong` lines (for `check`)."""
    problems = []
    if source.kind == "patroni":
        from reaper.kinds.patroni import parse_etcd_dsn  # httpx: only when a patroni source is configured

        try:
            parse_etcd_dsn(source.dsn)
        except ValueError as e:
            problems.append(f"dsn: {e}")
    elif not re.match(r"^postgres(ql)?://", source.dsn):
        problems.append(f"dsn: {DSN_EXPECTED}")
    if source.kind in DISCOVERY_KINDS and source.discovery_interval_seconds <= 0:
        problems.append("discovery_interval_seconds: must be more than 0")
    if source.kind not in DISCOVERY_KINDS:
        for key in ("include_pattern", "exclude_pattern"):
            if getattr(source, key):
                problems.append(f"{key}: only used by kinds postgres-discovery and patroni")
    return problems
