"""Routing a source's due metric to the SQL it runs on the server it is connected to (reaper.daemon.source)."""

from __future__ import annotations

from collections.abc import Callable

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

