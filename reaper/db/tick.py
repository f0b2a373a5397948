"""What a tick asks of a monitored server and what it gets back, and the server's facts: plain data that
the daemon and the special metrics read (re-exported by reaper.db)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class ServerInfo:
    version_num: int
    version: str
    in_recovery: bool
    database: str
    system_identifier: str | None
    extensions: frozenset[str]
    is_local: bool
    address: str = ""  # host:port (or the unix socket) this connection reached
    search_path: str | None = None  # the one reaper pinned for the session; None: the server's (a pooler's)
    idle_session_timeout: str | None = None  # the server's, when it ends idle sessions ("2s"); None: it does not
    started: float = 0.0  # when the server started (epoch seconds): a reconnection tells a restart by it
    extensions_mark: int = 0  # reaper.db.facts.EXTENSIONS_MARK as `extensions` were read

    @property
    def major(self) -> int:
        return self.version_num // 10000


@attrs.frozen
class SoloQuery:
    sql: str
    statement_timeout_seconds: float | None = None


@attrs.frozen
class TickRequest:
    """What one tick asks of the server.

    `batch` metrics share one combined statement. `timed` metrics (those with their own
    statement_timeout_seconds) share one more combined statement per distinct timeout, run in a
    read-only transaction under that timeout (a group of two or more cancelled by its timeout comes back
    in `TickOutcome.cancelled`: which member was slow is unknown, the caller re-runs each alone). `solo`
    metrics (degraded ones) run alone. Timed metrics without a batch (the slow lane's groups,
    reaper.daemon.jobs) send no batch statement: `in_recovery` is None then.
    """

    batch: Mapping[str, str]
    solo: Mapping[str, SoloQuery] = attrs.field(factory=dict)
    timed: Mapping[str, SoloQuery] = attrs.field(factory=dict)
    count_active: bool = False  # also count the server's active client backends (in the batch's statement)
    # the source's batched metrics, due or not (name -> SQL): members of the batch's one statement (combined.py)
    universe: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class TickOutcome:
    rows: dict[str, list[dict[str, Any]]]
    errors: dict[str, str]
    in_recovery: bool | None
    statements: int  # statements executed for this tick (1 when the batch went through whole)
    isolated: bool  # the combined statement failed and its metrics were re-run one by one
    seconds: dict[str, float] = attrs.field(factory=dict)  # metric -> server time it took (reaper.db.combined)
    active_backends: int | None = None  # when asked for: other client backends in state 'active'
    go_ready: frozenset[str] = frozenset()  # metrics whose rows' numbers are in Go's JSON form (reaper.db.rows)
    cancelled: frozenset[str] = frozenset()  # timed metrics whose shared statement hit its timeout: no rows, no error
