"""A source's fleet rules, decided on its fast lane's connection: `only_if_primary`, `min_db_size_mb` and the
opt-in `[collector] create_extensions` (reaper.daemon.source asks before each tick and after each connect)."""

from __future__ import annotations

import logging

import attrs
import trio

from reaper.config.schema import SourceConfig
from reaper.daemon.sourcestate import FleetControls, SourceState
from reaper.db.link import SourceLink
from reaper.errors import SourceUnavailable

log = logging.getLogger("reaper.daemon.source")

SIZE_CHECK_SECONDS = 600.0
DB_SIZE_SQL = "select (sum(relpages)::int8 * current_setting('block_size')::int8) as bytes from pg_class"


@attrs.define
class FleetRules:
    """What the rules remember for one source: the last size check and verdict, whether extensions were tried."""

    skip_reason: str | None = None  # why the source is connected but not collected
    size_checked_at: float | None = None
    too_small: bool = False
    extensions_tried: bool = False

    async def should_collect(self, config: SourceConfig, controls: FleetControls, state: SourceState,
                             conn: SourceLink) -> bool:
        """only_if_primary and min_db_size_mb (the size read at most every SIZE_CHECK_SECONDS). Logged once
        per change of verdict; the source's status is "skipped" meanwhile."""
        reason = None
        if config.only_if_primary and state.in_recovery:
            reason = "the server is in recovery and only_if_primary is set"
        elif controls.min_db_size_mb > 0 and conn.checks_size:
            now = trio.current_time()
            if self.size_checked_at is None or now - self.size_checked_at >= SIZE_CHECK_SECONDS:
                self.size_checked_at = now
                try:
                    with trio.fail_after(config.query_timeout_seconds):
                        rows = await conn.fetch(DB_SIZE_SQL)
                    size_mb = int(rows[0]["bytes"] or 0) / 1024 / 1024
                    self.too_small = size_mb < controls.min_db_size_mb
                except (SourceUnavailable, trio.TooSlowError):
                    pass  # the next tick's batch reports the connection state
            if self.too_small:
                reason = f"the database is smaller than min_db_size_mb ({controls.min_db_size_mb} MB)"
        if reason != self.skip_reason:
            if reason:
                log.warning("source %s: not collecting: %s", state.name, reason)
            elif self.skip_reason:
                log.warning("source %s: collecting again", state.name)
            self.skip_reason = reason
        if reason:
            state.status = "skipped"
        elif state.status == "skipped":
            state.status = "up"
        return reason is None

    async def create_extensions(self, config: SourceConfig, controls: FleetControls, conn: SourceLink) -> None:
        """Opt-in ([collector] create_extensions): create the listed extensions on a primary, once."""
        wanted = [e for e in controls.create_extensions if e not in conn.server.extensions]
        if not conn.creates_extensions or not wanted or conn.server.in_recovery or self.extensions_tried:
            return
        self.extensions_tried = True
        try:
            with trio.fail_after(config.query_timeout_seconds):
                result = await conn.create_extensions(wanted)
        except (SourceUnavailable, trio.TooSlowError) as e:
            log.warning("source %s: could not create extensions %s: %s", config.name, ", ".join(wanted), e)
            return
        for name, error in result.items():
            if error is None:
                log.info("source %s: created extension %s", config.name, name)
            else:
                log.warning("source %s: could not create extension %s: %s", config.name, name, error)
