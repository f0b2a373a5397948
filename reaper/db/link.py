"""The typed boundary between a source's lanes and a connection: `SourceLink`.

A lane (reaper.daemon) needs a connection to run a tick's one statement, run one statement alone,
read a few rows, and close. Two classes implement it: `reaper.db.SourceConnection` (asyncpg, a
PostgreSQL server) and `reaper.db.simple.SimpleConnection` (psycopg's simple query protocol, a
pooler's console). What differs by kind is a property of the link, never a kind check in a lane:

- `combines`: whether a tick's metrics share one combined statement (a pooler runs each alone);
- `checks_size`: whether `min_db_size_mb` applies (a pooler's console has no database size);
- `creates_extensions`: whether `create_extensions` can do anything;
- `product`: the product and version an operator reads in the log ("PostgreSQL 15.4").

`statements` counts every statement the link has sent since it opened; lanes report its deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from reaper.db import ServerInfo, SoloQuery, TickOutcome, TickRequest

Row = dict[str, Any]


class SourceLink(Protocol):
    @property
    def server(self) -> ServerInfo: ...

    @property
    def is_closed(self) -> bool: ...

    @property
    def statements(self) -> int: ...

    @property
    def combines(self) -> bool: ...

    @property
    def checks_size(self) -> bool: ...

    @property
    def creates_extensions(self) -> bool: ...

    @property
    def product(self) -> str: ...

    async def run_tick(self, request: TickRequest) -> TickOutcome:
        """A whole tick; raises SourceUnavailable when the connection breaks."""
        ...

    async def run_one(self, name: str, query: SoloQuery) -> list[Row]:
        """One metric's statement alone (under its own statement timeout, if any).
        Raises MetricError when the statement fails, SourceUnavailable when the connection breaks."""
        ...

    async def fetch(self, sql: str, *args: object) -> list[Row]: ...

    async def create_extensions(self, names: Sequence[str]) -> dict[str, str | None]: ...

    async def close(self) -> None: ...

    def terminate(self) -> None: ...
