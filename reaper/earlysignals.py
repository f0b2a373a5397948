"""Signals that come while `reaper run` starts: noted by the entry point (reaper.launch), handled by the
daemon once it watches its signals (reaper.daemon.root). No import of reaper's own: both ends take it."""

from __future__ import annotations

import signal
from types import FrameType

EARLY: list[int] = []  # SIGHUP / SIGUSR1 received before the daemon watched its signals, in order


def _note(signum: int, _frame: FrameType | None) -> None:
    if signum not in EARLY:
        EARLY.append(signum)


def keep_early_signals() -> None:
    signal.signal(signal.SIGHUP, _note)
    signal.signal(signal.SIGUSR1, _note)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def take_early_signals() -> list[int]:
    taken = list(EARLY)
    EARLY.clear()
    return taken
