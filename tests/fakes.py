"""A scripted stand-in for a database connection, for scheduler and supervisor tests only.

Anything that claims database behaviour is tested against a real PostgreSQL instead.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, PresetDef, SourceConfig
from reaper.errors import SourceUnavailable


def sql_metric(name: str, **kwargs: Any) -> MetricDef:
    return MetricDef(name=name, description=name, sql={14: f"select 1 as {name}"}, **kwargs)


def catalog(*metrics: MetricDef, presets: dict[str, dict[str, int]] | None = None) -> Catalog:
    defs = {m.name: m for m in metrics}
    defs.setdefault("instance_up", MetricDef(name="instance_up", description="up", special=True))
    return Catalog(metrics=defs, presets={k: PresetDef(metrics=v) for k, v in (presets or {}).items()})


def source(name: str = "src", **kwargs: Any) -> SourceConfig:
    return SourceConfig(name=name, dsn=f"postgresql://fake/{name}", **kwargs)


SERVER = db.ServerInfo(version_num=150004, version="15.4", in_recovery=False, database="app",
                       system_identifier="1", extensions=frozenset(), is_local=False)


@attrs.define(eq=False)
class FakeConnection:
    """Answers each tick: rows for every metric, errors for the ones named in `failing`."""

    failing: set[str] = attrs.field(factory=set)
    in_recovery: bool = False
    latency: float = 0.0
    requests: list[tuple[float, db.TickRequest]] = attrs.field(factory=list)
    closed: bool = False
    broken: bool = False
    db_size_bytes: int = 100 * 1024 * 1024
    fetches: list[str] = attrs.field(factory=list)

    @property
    def server(self) -> db.ServerInfo:
        return attrs.evolve(SERVER, in_recovery=self.in_recovery)

    @property
    def is_closed(self) -> bool:
        return self.closed

    async def run_tick(self, request: db.TickRequest) -> db.TickOutcome:
        self.requests.append((trio.current_time(), request))
        if self.latency:
            await trio.sleep(self.latency)
        if self.broken:
            raise SourceUnavailable("connection reset")
        rows: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, str] = {}
        names = list(request.batch) + list(request.solo) + list(request.timed)
        for name in names:
            if name in self.failing:
                errors[name] = "division by zero"
            else:
                rows[name] = [{"epoch_ns": 1, name: 1}]
        isolated = any(n in self.failing for n in request.batch)
        return db.TickOutcome(rows=rows, errors=errors, in_recovery=self.in_recovery,
                              statements=1 + (len(request.batch) if isolated else 0) + len(request.solo),
                              isolated=isolated)

    async def fetch(self, sql: str) -> list[dict[str, Any]]:
        self.fetches.append(sql)
        return [{"bytes": self.db_size_bytes}]

    def terminate(self) -> None:
        self.closed = True

    async def close(self) -> None:
        self.closed = True


@attrs.define(eq=False)
class FakeConnector:
    """Hands out `conn`; raises SourceUnavailable while `down`; hangs forever while `hang`."""

    conn: FakeConnection = attrs.field(factory=FakeConnection)
    down: bool = False
    hang: bool = False
    attempts: list[float] = attrs.field(factory=list)

    async def __call__(self, config: SourceConfig) -> FakeConnection:
        self.attempts.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        if self.down:
            raise SourceUnavailable("connection refused")
        self.conn.closed = False
        self.conn.broken = False
        return self.conn
