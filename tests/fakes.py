"""A scripted stand-in for a database connection, for scheduler and supervisor tests only.

Anything that claims database behaviour is tested against a real PostgreSQL instead.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import trio

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, PresetDef, SourceConfig
from reaper.errors import MetricError, SourceUnavailable
from reaper.special.facts import FACTS_SQL


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
# a fake server's now(): its clock is the test's (mock) clock, its date this test run's (reaper gives
# rows dated more than a day from its own clock their collection time instead, and says so)
EPOCH_BASE_NS = time.time_ns()

FACTS_ROW = {"via_socket": True, "data_directory": "/fake/data", "log_directory": "log", "logging_collector": "on",
             "log_destination": "stderr", "role": "reaper", "can_read_binary": False, "can_read_text": False,
             "tablespaces": "[]"}  # what reaper.special.facts reads first on a slow lane's new connection


@attrs.define(eq=False)
class FakeConnection:
    """A scripted reaper.db.link.SourceLink. Answers each tick: rows for every metric, errors for the
    ones named in `failing`; `slow` gives a metric run alone (`run_one`), or a `fetch` of the SQL it names,
    a latency in seconds; a metric in `over_timeout` makes its timed group's statement come back cancelled,
    and fails alone as past its timeout."""

    combines = True
    checks_size = True
    creates_extensions = True

    failing: set[str] = attrs.field(factory=set)
    in_recovery: bool = False
    latency: float = 0.0
    requests: list[tuple[float, db.TickRequest]] = attrs.field(factory=list)
    closed: bool = False
    broken: bool = False
    db_size_bytes: int = 100 * 1024 * 1024
    fetches: list[str] = attrs.field(factory=list)
    slow: dict[str, float] = attrs.field(factory=dict)
    runs: list[tuple[float, str]] = attrs.field(factory=list)  # (trio time, metric) of each run_one
    statements: int = 0
    over_timeout: set[str] = attrs.field(factory=set)

    @property
    def product(self) -> str:
        return "PostgreSQL 15.4"

    _server: db.ServerInfo = attrs.field(init=False, factory=lambda: attrs.evolve(SERVER))  # its own object

    @property
    def server(self) -> db.ServerInfo:
        """One object for the connection's life, as reaper.db's (facts are kept per connection)."""
        if self._server.in_recovery != self.in_recovery:
            self._server = attrs.evolve(SERVER, in_recovery=self.in_recovery)
        return self._server

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
        cancelled = frozenset(request.timed) if len(request.timed) > 1 and self.over_timeout & set(request.timed) \
            else frozenset()
        for name in (n for n in names if n not in cancelled):
            if name in self.failing:
                errors[name] = "division by zero"
            else:
                rows[name] = [{"epoch_ns": EPOCH_BASE_NS + int(trio.current_time() * 1e9), name: 1}]
        isolated = any(n in self.failing for n in request.batch)
        outcome = db.TickOutcome(rows=rows, errors=errors, in_recovery=self.in_recovery,
                                 statements=1 + (len(request.batch) if isolated else 0) + len(request.solo),
                                 isolated=isolated, cancelled=cancelled)
        self.statements += outcome.statements
        return outcome

    async def run_one(self, name: str, query: db.SoloQuery) -> list[dict[str, Any]]:
        self.runs.append((trio.current_time(), name))
        self.statements += 1
        await trio.sleep(self.slow.get(name, 0.0))
        if self.broken:
            raise SourceUnavailable("connection reset")
        if name in self.failing:
            raise MetricError(name, "division by zero")
        if name in self.over_timeout:
            raise MetricError(name, "canceling statement due to statement timeout")
        return [{"epoch_ns": EPOCH_BASE_NS + int(trio.current_time() * 1e9), name: 1}]

    async def fetch(self, sql: str, *args: object) -> list[dict[str, Any]]:
        self.fetches.append(sql)
        self.statements += 1
        await trio.sleep(self.slow.get(sql, 0.0))  # `slow` may name a fetch's SQL too
        return [dict(FACTS_ROW)] if sql == FACTS_SQL else [{"bytes": self.db_size_bytes}]

    async def create_extensions(self, names: Any) -> dict[str, str | None]:
        return {name: None for name in names}

    def terminate(self) -> None:
        self.closed = True

    async def close(self) -> None:
        self.closed = True


@attrs.define(eq=False)
class FakeConnector:
    """Hands out `conn` (the fast lane's) when it is not in use, else a second connection (the slow
    lane's, kept in `others`, sharing `conn`'s script); raises SourceUnavailable while `down`; hangs
    forever while `hang`; takes `seconds` to connect."""

    conn: FakeConnection = attrs.field(factory=FakeConnection)
    down: bool = False
    hang: bool = False
    seconds: float = 0.0
    attempts: list[float] = attrs.field(factory=list)
    others: list[FakeConnection] = attrs.field(factory=list)
    _handed: bool = False

    async def __call__(self, config: SourceConfig) -> FakeConnection:
        self.attempts.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        await trio.sleep(self.seconds)
        if self.down:
            raise SourceUnavailable("connection refused")
        if self._handed and not self.conn.closed:
            other = FakeConnection(failing=self.conn.failing, in_recovery=self.conn.in_recovery,
                                   slow=self.conn.slow, over_timeout=self.conn.over_timeout)
            self.others.append(other)
            return other
        self._handed = True
        self.conn.closed = False
        self.conn.broken = False
        return self.conn

    def open_connections(self) -> int:
        return sum(not c.closed for c in (self.conn, *self.others) if c is not self.conn or self._handed)


def count_spawns(monkeypatch: Any) -> list[Any]:
    """Every trio.run_process call from now on (the real process still runs): the list of their args."""
    spawns: list[Any] = []
    real = trio.run_process

    async def counted(*args: Any, **kwargs: Any) -> Any:
        spawns.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(trio, "run_process", counted)
    return spawns
