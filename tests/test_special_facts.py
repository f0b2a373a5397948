"""The server facts the special metrics share (reaper.special.facts), under trio's MockClock: read once
per connection, read again after FACTS_SECONDS, except while a local collector's lease finds the slow
lane's connection busy (a slow metric's statement holds it): the facts of ten minutes ago are used then,
so an OS metric does not wait behind that statement until its deadline and fail."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from fakes import SERVER, source

from reaper.config.schema import MetricDef
from reaper.daemon.lanes import Lane, LeasedLink
from reaper.db import ServerInfo
from reaper.special import SpecialContext, facts
from reaper.special.facts import FACTS_SECONDS, server_facts

FACTS_ROW = {"via_socket": True, "data_directory": "/srv/pg", "log_directory": "log", "logging_collector": "on",
             "log_destination": "stderr", "role": "reaper", "can_read_binary": False, "can_read_text": False,
             "tablespaces": "[]"}


class FixedLink:
    """A slow lane's connection with one ServerInfo for its life (facts are kept per connection)."""

    combines = False
    is_closed = False

    def __init__(self) -> None:
        self.server: ServerInfo = SERVER
        self.statements = 0
        self.fetches = 0

    async def fetch(self, sql: str, *args: object) -> list[dict[str, Any]]:
        self.fetches += 1
        self.statements += 1
        return [dict(FACTS_ROW)]


@pytest.fixture(autouse=True)
def no_kept_facts() -> Any:
    facts.forget()
    yield
    facts.forget()


async def test_stale_facts_are_used_while_the_slow_lanes_connection_is_busy(autojump_clock) -> None:
    lane = Lane("slow", owner=None)  # type: ignore[arg-type]  # ensure_link finds its link open
    link = FixedLink()
    lane.link = link  # type: ignore[assignment]
    host = MetricDef(name="vmstat", description="host figures", special=True)
    ctx = SpecialContext(source=source(), server=SERVER, conn=LeasedLink(lane), metric=host, wall_ns=1, state={})
    first = await server_facts(ctx)
    assert first.data_directory == "/srv/pg" and link.fetches == 1
    await trio.sleep(10)
    assert await server_facts(ctx) == first and link.fetches == 1  # kept for the connection
    await trio.sleep(FACTS_SECONDS)
    async with lane.lock:  # a slow metric's statement holds the connection
        with trio.fail_after(1):  # never waits for the lock
            assert await server_facts(ctx) == first
    assert link.fetches == 1
    await server_facts(ctx)  # the connection free again: read anew
    assert link.fetches == 2
