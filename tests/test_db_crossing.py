"""reaper.db.crossing: an asyncio-side failure that means the connection is lost becomes SourceUnavailable (the
source drops the connection, reports itself down and reconnects); anything else propagates as it is."""

from __future__ import annotations

import asyncpg
import pytest

from reaper import db
from reaper.errors import SourceUnavailable


async def test_a_confused_asyncpg_protocol_is_a_lost_connection() -> None:
    """A server's FATAL message read while the connection was idle (`drop database ... with (force)`), and
    the next statement started before the connection's end was processed: asyncpg raises InternalClientError
    from its protocol. It crashed the source's task with a traceback (CI, the thirty-reloads race test)."""

    async def confused() -> None:
        raise asyncpg.InternalClientError("cannot switch to state 11; another operation (2) is in progress")

    async with db.open_loop():
        with pytest.raises(SourceUnavailable, match="cannot switch to state 11"):
            await db.crossing(confused)


async def test_a_bug_on_the_asyncio_side_propagates_as_it_is() -> None:
    async def buggy() -> None:
        raise KeyError("a bug, not an outage")

    async with db.open_loop():
        with pytest.raises(KeyError):
            await db.crossing(buggy)
