"""systemd's service notifications (sd_notify(3)) for a `Type=notify` unit, and its watchdog.

Under systemd with `Type=notify`, `reaper run` says READY=1 once its sinks and sources are started (so
`systemctl start` returns when the daemon collects, and units ordered after it start then), RELOADING=1 and
READY=1 around each reload (`systemctl status` shows "reloading"; a refused config says so in STATUS=),
STOPPING=1 when a stop begins, and a one-line STATUS= that `systemctl status` prints. With `WatchdogSec=`, the
trio loop sends WATCHDOG=1 every third of it: a daemon whose loop no longer turns (a state dir on a file system
that stopped answering, a bug that blocks) is killed and, with `Restart=on-failure`, started again.

The protocol is one datagram of `KEY=value` lines to the unix socket in $NOTIFY_SOCKET (`@` for Linux's
abstract namespace). It is a few lines of standard library here: python-systemd needs libsystemd's headers to
build, and the small PyPI clients do no more than this. The variables are taken out of the environment, so
the programs reaper runs (pgbackrest, smartctl, a command prefix) never notify in its name. Without
$NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

import trio

log = logging.getLogger("reaper.daemon.systemd")

MAX_STATUS_CHARS = 200  # one line in `systemctl status`
MIN_KEEP_ALIVE_SECONDS = 0.05  # (a WatchdogSec= of microseconds must not make the loop spin)


class Notifier:
    """Sends the daemon's state to systemd (no-op when the daemon was not started by a Type=notify unit)."""

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds if address else None
        self._sock: socket.socket | None = None
        self._failed = False  # the first failure is said, once
        self._said = ""  # the last STATUS= line sent

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """NOTIFY_SOCKET and the watchdog's WATCHDOG_USEC (ours only when WATCHDOG_PID, if set, is our pid),
        removed from the environment."""
        address = environ.pop("NOTIFY_SOCKET", None) or None
        usec, pid = environ.pop("WATCHDOG_USEC", ""), environ.pop("WATCHDOG_PID", "")
        seconds = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            seconds = int(usec) / 1e6
        return cls(address, seconds)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> None:
        """One datagram; never raises (systemd gone, a full socket buffer: the daemon goes on)."""
        if self.address is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), target)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd at %s: %s (the unit's Type=notify start, reload or watchdog "
                            "may time out)", self.address, e.strerror or e)

    def _status(self, text: str) -> str:
        line = " ".join(text.split())  # one line whatever the text holds
        self._said = "STATUS=" + (line if len(line) <= MAX_STATUS_CHARS else line[:MAX_STATUS_CHARS - 3] + "...")
        return self._said

    def ready(self, status: str) -> None:
        self.send("READY=1", self._status(status))

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd (253 on) matches the READY=1 that follows to this reload
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  self._status("reloading the configuration"))

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", self._status(status))

    def status(self, text: str) -> None:
        """STATUS= alone, when it says something new (the status file's writer calls it after each write)."""
        if self.address is not None and "STATUS=" + " ".join(text.split()) != self._said:
            self.send(self._status(text))

    async def keep_alive(self) -> None:
        """WATCHDOG=1 every third of the watchdog's interval, from the trio loop (only run when it has one)."""
        assert self.watchdog_seconds is not None
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(max(MIN_KEEP_ALIVE_SECONDS, self.watchdog_seconds / 3))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
