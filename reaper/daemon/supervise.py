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


async def supervise(reaper: Supervised, *, restart_limit: int = RESTART_LIMIT,
                    window: float = RESTART_WINDOW_SECONDS, jitter: Callable[[], float] | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a source (its nursery: fast lane, slow lane, local collectors), restarting it after an
    unexpected error with capped, jittered exponential backoff (reset once a run has stayed healthy),
    within an intensity limit.

    Expected failures (an unreachable server, a failing metric) never reach here: the lanes handle
    them. Anything that does is a bug: its traceback is logged once (each distinct error), later crashes in
    one line. After `restart_limit` crashes within `window` seconds the source stays stopped, status
    "crashed" with the error, while every other source collects (it used to stop the whole daemon, and
    systemd's restart brought the same crash back for all of them); the next reload tries it again
    (`retry_crashed`).
    """
    jitter = jitter or (lambda: random.uniform(0.5, 1.0))
    crashes: list[float] = []  # a list: an empty deque holds a 600-byte block, for each of 1000 sources
    said: set[str] = set()  # the errors whose traceback was logged
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
            leaf: BaseException = e
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:  # (the source's nursery's)
                leaf = leaf.exceptions[0]
            name, error = reaper.config.name, f"{type(leaf).__name__}: {leaf}"
            first = error not in said
            said.add(error)
            if len(crashes) > restart_limit:
                log.log(logging.ERROR, "source %s: crashed %d times in %gs on a bug in reaper (%s): it stays stopped, "
                        "the other sources collect; a reload (`reaper reload`) tries it again", name, len(crashes),
                        window, error, exc_info=e if first else None)
                reaper.state.status, reaper.state.last_error = "crashed", f"a bug in reaper: {error}"
                retry = reaper.state.retry = trio.Event()
                await retry.wait()
                reaper.state.retry = None
                log.warning("source %s: trying again after the reload", name)
                crashes.clear()
                delay = 1.0
                continue
            wait = delay * jitter()
            log.log(logging.ERROR, "source %s: unexpected error (a bug in reaper: %s); restarting in %.1fs", name,
                    error, wait, exc_info=e if first else None)
            reaper.state.status = "restarting"
            await trio.sleep(wait)
            delay = min(delay * 2, RESTART_BACKOFF_MAX)
