"""Routing a source's due metric to the SQL it runs on the server it is connected to (reaper.daemon.source)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from reaper.config.schema import MetricDef
from reaper.db.tick import ServerInfo

Warn = Callable[[str, str, str], None]  # (metric, why, text): logged once per metric and why


def route_sql(server: ServerInfo, metric: MetricDef, warn: Warn) -> str | None:
    """The SQL to run for a due metric on this server, or None (unsupported here: warned once)."""
    sql = metric.sql_for(server.major)
    if sql is None:
        warn(metric.name, "version", f"has no SQL for PostgreSQL {server.major} (versions: "
                                     f"{', '.join(map(str, sorted(metric.sql)))}); skipped")
        return None
    missing = [e for e in metric.requires_extension if e not in server.extensions]
    if missing:
        warn(metric.name, "extension", f"needs the extension {', '.join(missing)}, which is not installed in "
                                       f"database {server.database}; skipped")
        return None
    return sql



def batched_sql(server: ServerInfo, metrics: Mapping[str, MetricDef], active: Mapping[str, int],
                degraded: Collection[str], specials: Collection[str]) -> dict[str, str]:
    """Every active metric a tick puts in its batch when due, with the SQL it runs on this server: the
    members of the batch's one statement (reaper.db.combined). Not specials, instance_up, metrics with a
    statement timeout of their own or degraded ones (each its own statement), nor what this server cannot
    run (route_sql warns about those when they come due)."""
    out: dict[str, str] = {}
    for name in active:
        metric = metrics.get(name)
        if (metric is None or name == "instance_up" or metric.special or name in specials or name in degraded
                or metric.statement_timeout_seconds is not None):
            continue
        sql = metric.sql_for(server.major)
        if sql is not None and all(e in server.extensions for e in metric.requires_extension):
            out[name] = sql
    return out


class BatchMembers:
    """A source's batched_sql plus `extra` entries, made again only when the active intervals (compared by
    identity: the source keeps one object per change), the server, the degraded metrics or the extras change."""

    __slots__ = ("_key", "_members")

    def __init__(self) -> None:
        self._key: tuple[Any, ...] = ()
        self._members: dict[str, str] = {}

    def members(self, server: ServerInfo, metrics: Mapping[str, MetricDef], active: Mapping[str, int],
                degraded: Collection[str], specials: Collection[str],
                extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
        key = self._key
        if key and key[0] is active and key[1] is server and key[2] == extra and key[3] == degraded:
            return self._members
        self._members = batched_sql(server, metrics, active, degraded, specials)
        self._members.update(extra)
        self._key = (active, server, extra, frozenset(degraded))
        return self._members
