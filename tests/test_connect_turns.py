"""The fleet's connect turns (reaper.daemon.sourcestate.connect_in_turn), under trio's MockClock: a connect
holds its turn for its first CONNECT_TURN_SECONDS at most, a cancelled one gives it back at once, and the
connect timeout counts from the turn, not from the wait for it."""

from __future__ import annotations

import math

import pytest
import trio

from reaper.config.schema import SourceConfig
from reaper.daemon.sourcestate import CONNECT_TURN_SECONDS, FleetControls, connect_in_turn
from reaper.errors import SourceUnavailable


def controls(turns: int) -> FleetControls:
    return FleetControls(connects=trio.CapacityLimiter(turns))


def source(timeout: float = 5.0) -> SourceConfig:
    return SourceConfig(name="s", dsn="postgresql://x@h/db", connect_timeout_seconds=timeout)


async def hang(config: SourceConfig) -> object:
    await trio.sleep(math.inf)
    raise AssertionError("unreachable")


async def test_a_hanging_connect_gives_its_turn_back_and_a_cancelled_one_at_once(autojump_clock) -> None:
    fleet = controls(1)
    got: list[float] = []

    async def healthy(config: SourceConfig) -> object:
        got.append(trio.current_time())
        return "link"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect_in_turn, fleet, source(timeout=100), hang)  # holds the only turn
        await trio.sleep(0.1)
        assert await connect_in_turn(fleet, source(), healthy) == "link"
        assert got == [pytest.approx(CONNECT_TURN_SECONDS)]  # not the hanging one's 100 s timeout
        nursery.cancel_scope.cancel()
    assert fleet.connects.borrowed_tokens == 0

    with trio.move_on_after(0.25):  # a connect cancelled mid-way (a reload stops its source)
        await connect_in_turn(fleet, source(timeout=100), hang)
    assert fleet.connects.borrowed_tokens == 0
    start = trio.current_time()
    await connect_in_turn(fleet, source(), healthy)
    assert got[-1] == start  # no wait: the turn came back with the cancel


async def test_the_connect_timeout_counts_from_the_turn(autojump_clock) -> None:
    fleet = controls(1)
    waited_from = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect_in_turn, fleet, source(timeout=100), hang)
        await trio.sleep(0.1)
        with pytest.raises(SourceUnavailable, match="connect timed out after 3s"):
            await connect_in_turn(fleet, source(timeout=3), hang)
        assert trio.current_time() - waited_from == pytest.approx(CONNECT_TURN_SECONDS + 3)
        nursery.cancel_scope.cancel()
