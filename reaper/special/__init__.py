"""Special metrics: collected by reaper's own code rather than by one SQL query.

Which metrics are special, and which handler collects each, is the static table in registry.py.
Each special metric has a handler `async (ctx) -> [(table, rows), ...]`; one run may produce rows
for several tables (change_events writes sproc_changes, table_changes, ...). A handler keeps what
it must remember between runs (baselines, log file offsets) in `ctx.state`, which lives as long as
the source's task, so an in-place config update (SIGHUP) keeps it. Handlers run after the tick's
batch, each under its own deadline; a failing one costs nobody else. A handler whose server reads are
plain queries names them (`reads`): they may ride in the fast lane's statement (reaper.daemon.rides), and
the handler then finds their outcome in `ctx.given` instead of sending its own statement.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from reaper.config.schema import MetricDef, SourceConfig
from reaper.db import ServerInfo, TickOutcome
from reaper.db.link import SourceLink
from reaper.special.registry import REGISTRY

Rows = list[dict[str, Any]]
Result = list[tuple[str, Rows]]


@attrs.define(eq=False)
class SpecialContext:
    source: SourceConfig
    server: ServerInfo
    conn: SourceLink  # the slow lane's connection (or, for local collectors, a lease of it)
    metric: MetricDef
    wall_ns: int
    state: dict[str, Any]
    given: TickOutcome | None = None  # its `reads`, done in the fast lane's statement of this tick


Handler = Callable[[SpecialContext], Awaitable[Result]]


@attrs.frozen
class SpecialSpec:
    handler: Handler
    local_only: bool = False  # needs reaper on the server's host (OS metrics, local log files)
    deadline_seconds: float = 60.0
    reads: Callable[[ServerInfo], Mapping[str, str]] | None = None  # queries that may ride in the fast tick


def _function(path: str) -> Any:
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


def special_spec(name: str) -> SpecialSpec | None:
    """How to collect special metric `name`: None when no handler collects it (see registry.py).

    The handler's module is imported here, on first use, not before.
    """
    entry = REGISTRY.get(name)
    if entry is None or entry.collector is None or ":" not in entry.collector:
        return None
    return SpecialSpec(_function(entry.collector), entry.local_only, entry.deadline_seconds,
                       _function(entry.reads) if entry.reads else None)
