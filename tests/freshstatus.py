"""Asking a `reaper run` child for a fresh status file (SIGUSR2), for the tests that poll it.

The daemon rewrites its status file when something an operator acts on changed, and its counters only
every STATUS_HEARTBEAT_SECONDS; a test that waits for a counter asks for a fresh file instead, as
`reaper status` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from reaper.daemon.status import STATUS_FILE, DaemonStatus, read_status_file

ASK_EVERY_SECONDS = 0.25  # a polling loop asks at most this often (each ask is one build and write)

_asked: dict[int, float] = {}


def ask(pid: int | None) -> None:
    """SIGUSR2 to the test's own daemon child `pid` (at most every ASK_EVERY_SECONDS per pid)."""
    if pid is None:
        return
    now = time.monotonic()
    if now - _asked.get(pid, -1e9) < ASK_EVERY_SECONDS:
        return
    _asked[pid] = now
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR2)


def read(state_dir: Path) -> DaemonStatus | None:
    try:
        return read_status_file(state_dir / STATUS_FILE)
    except (OSError, ValueError):
        return None


def polled(pid: int | None, state_dir: Path) -> DaemonStatus | None:
    """For a polling loop: ask for a fresh file (throttled) and read the one there now. Only a daemon that
    has written its own file is asked: before that its SIGUSR2 handling may not be installed yet (the
    default action ends the process), and an earlier process's file may still be there."""
    status = read(state_dir)
    if status is not None and status.pid == pid:
        ask(pid)
    return read(state_dir)


def fresh(pid: int, state_dir: Path, limit: float = 15.0) -> DaemonStatus:
    """A status file written after this call asked for it (its counters include the latest ticks)."""
    since = time.time()
    _asked.pop(pid, None)
    deadline = time.monotonic() + limit
    while True:
        status = read(state_dir)
        if status is not None and status.pid == pid:
            ask(pid)
            status = read(state_dir)
        if status is not None and status.pid == pid and status.updated_wall > since:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"no fresh status file from pid {pid} in {state_dir} within {limit:g}s")
        time.sleep(0.05)
