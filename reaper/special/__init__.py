"""Special metrics: collected by reaper's own code rather than by one SQL query.

Each special metric has a handler `async (ctx) -> [(table, rows), ...]`; one run may produce rows
for several tables (change_events writes sproc_changes, table_changes, ...). A handler keeps what
it must remember between runs (baselines, log file offsets) in `ctx.state`, which lives as long as
the source's task, so an in-place config update (SIGHUP) keeps it. Handlers run after the tick's
batch, each under its own deadline; a failing one costs nobody else.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from reaper.config.schema import MetricDef, SourceConfig

Rows = list[dict[str, Any]]
Result = list[tuple[str, Rows]]


@attrs.define(eq=False)
class SpecialContext:
    source: SourceConfig
    server: Any  # reaper.db.ServerInfo
    conn: Any  # reaper.db.SourceConnection: fetch(sql, *args), run_tick(TickRequest)
    metric: MetricDef
    wall_ns: int
    state: dict[str, Any]


Handler = Callable[[SpecialContext], Awaitable[Result]]


@attrs.frozen
class SpecialSpec:
    handler: Handler
    local_only: bool = False  # needs reaper on the server's host (OS metrics, local log files)
    deadline_seconds: float = 60.0


_REGISTRY: dict[str, SpecialSpec] = {}
# Modules that register handlers when imported (each calls `register`).
HANDLER_MODULES = ("reaper.special.osmetrics", "reaper.special.changes", "reaper.special.serverlog")


def register(name: str, handler: Handler, *, local_only: bool = False, deadline_seconds: float = 60.0) -> None:
    _REGISTRY[name] = SpecialSpec(handler, local_only, deadline_seconds)


def special_spec(name: str) -> SpecialSpec | None:
    if not _REGISTRY:
        for module in HANDLER_MODULES:
            importlib.import_module(module)
    return _REGISTRY.get(name)
