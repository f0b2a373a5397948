"""Supervision of a source's nursery: restart after a bug, with backoff, within an intensity limit."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Protocol

import trio

from reaper.config.schema import SourceConfig
from reaper.daemon.sourcestate import SourceState


class Supervised(Protocol):
    """What the supervisor runs (reaper.daemon.source.SourceReaper); a Protocol, so that this module does
    not import the one that uses it."""

    config: SourceConfig
    state: SourceState

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

log = logging.getLogger("reaper.daemon.source")

RESTART_LIMIT = 5
RESTART_WINDOW_SECONDS = 300.0
HEALTHY_AFTER_SECONDS = 120.0  # a run this long resets the restart backoff
RESTART_BACKOFF_MAX = 60.0


class TooManyRestarts(Exception):
    """A source task kept crashing with unexpected errors: a bug, so the daemon exits non-zero."""


async def supervise(reaper: Supervised, *, restart_limit: int = RESTART_LIMIT,
                    window: float = RESTART_WINDOW_SECONDS, jitter: Callable[[], float] | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a source (its nursery: fast lane, slow lane, local collectors), restarting it after an
    unexpected error with capped, jittered exponential backoff (reset once a run has stayed healthy),
    within an intensity limit.

    Expected failures (an unreachable server, a failing metric) never reach here: the lanes handle
    them. Anything that does is a bug; after `restart_limit` crashes within `window` seconds the
    error propagates and stops the daemon with the cause.
    """
    jitter = jitter or (lambda: random.uniform(0.5, 1.0))
    crashes: list[float] = []  # a list: an empty deque holds a 600-byte block, for each of 1000 sources
    delay = 1.0
    started = False
    while True:
        began = trio.current_time()
        try:
            if started:
                await reaper.run()
            else:
                await reaper.run(task_status=task_status)
                started = True
            return
        except Exception as e:
            started = True
            now = trio.current_time()
            if now - began >= HEALTHY_AFTER_SECONDS:
                delay = 1.0
            crashes.append(now)
            while crashes and crashes[0] < now - window:
                del crashes[0]
            if len(crashes) > restart_limit:
                raise TooManyRestarts(
                    f"source {reaper.config.name}: crashed {len(crashes)} times in {window:g}s; last error: {e!r}"
                ) from e
            wait = delay * jitter()
            log.exception("source %s: unexpected error (a bug); restarting in %.1fs", reaper.config.name, wait)
            reaper.state.status = "restarting"
            await trio.sleep(wait)
            delay = min(delay * 2, RESTART_BACKOFF_MAX)
