"""systemd's Type=notify and watchdog, from outside: a real `reaper run` that systemd would start, with the
notification socket a test binds where systemd's would be ($NOTIFY_SOCKET, $WATCHDOG_USEC).

A `Type=notify` unit waits for READY=1 before `systemctl start` returns (and times out, killing the daemon,
when none comes); `WatchdogSec=` kills a daemon that stops sending WATCHDOG=1. reaper said none of it:
such a unit never started, and a hung daemon (a state dir on a file system that stopped answering) was never
restarted. Now: READY=1 once sinks and sources are started, RELOADING=1 then READY=1 around each reload
(the refused one says so), STOPPING=1 at a stop, STATUS= lines, and WATCHDOG=1 from the trio loop.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import ServerHandle
from test_daemon import Daemon, wait_until

pytestmark = pytest.mark.pg


class FakeSystemd:
    """The unix datagram socket systemd listens on for a unit's notifications."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def read(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def with_key(self, key: str) -> list[dict[str, str]]:
        return [m for m in self.read() if key in m]


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake.path))  # the daemon inherits the test's environment
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # WatchdogSec=0.6: a keep-alive every 0.2 s
    yield fake
    fake.sock.close()


def test_a_notify_unit_hears_ready_reloading_stopping_and_the_watchdog(pg15: ServerHandle, fresh_db: str,
                                                                       tmp_path: Path, systemd: FakeSystemd) -> None:
    daemon = Daemon(tmp_path)
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1), ("gone", "postgresql://reaper@127.0.0.1:1/x", 1)])
    daemon.start()
    try:
        wait_until(lambda: systemd.with_key("READY"), what="READY=1")
        ready = systemd.with_key("READY")[0]
        assert ready["READY"] == "1" and ready["STATUS"].startswith("collecting: 2 sources"), ready
        # the keep-alive comes from the running loop, again and again
        wait_until(lambda: len(systemd.with_key("WATCHDOG")) >= 5, what="five WATCHDOG=1")
        # the status line follows the sources: the one on port 1 goes down
        wait_until(lambda: any("(1 down)" in m.get("STATUS", "") for m in systemd.read()), what="STATUS with 1 down")

        before = len(systemd.messages)
        daemon.signal(signal.SIGHUP)  # systemctl reload: the same config again
        wait_until(lambda: [m for m in systemd.read()[before:] if "READY" in m], what="READY=1 after the reload")
        after = [m for m in systemd.messages[before:] if "RELOADING" in m or "READY" in m]
        assert [("RELOADING" in m, "READY" in m) for m in after] == [(True, False), (False, True)], after
        assert int(after[0]["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

        before = len(systemd.messages)
        daemon.config.write_text(daemon.config.read_text() + "\nnot toml [\n")
        daemon.signal(signal.SIGHUP)  # a refused reload: ready again, on the previous configuration
        wait_until(lambda: [m for m in systemd.read()[before:] if "READY" in m], what="READY=1 after a refusal")
        refused = next(m for m in systemd.messages[before:] if "READY" in m)
        assert "was refused" in refused["STATUS"] and "previous configuration" in refused["STATUS"], refused
    finally:
        assert daemon.stop() == 0
    stopping = systemd.with_key("STOPPING")
    assert len(stopping) == 1 and stopping[0]["STATUS"].startswith("stopping"), stopping
    after = systemd.messages[systemd.messages.index(stopping[0]) + 1:]
    assert not [m for m in after if "STATUS" in m], after  # `systemctl status` says "stopping" to the end
    assert "NOTIFY_SOCKET" not in daemon.log_text()  # nothing went wrong sending


def test_the_notify_variables_are_not_handed_to_the_programs_reaper_runs(tmp_path: Path,
                                                                         systemd: FakeSystemd) -> None:
    """reaper's children (pgbackrest, smartctl, a command prefix) must not notify in its name: the variables are
    taken out of the environment as the daemon starts."""
    from reaper.daemon.systemd import Notifier

    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "600000", "WATCHDOG_PID": str(os.getpid()),
           "PATH": "/usr/bin"}
    notifier = Notifier.from_environment(env)
    assert env == {"PATH": "/usr/bin"}
    assert notifier.enabled and notifier.watchdog_seconds == 0.6
    notifier.ready("collecting")
    assert systemd.with_key("READY") == [{"READY": "1", "STATUS": "collecting"}]
    # a watchdog meant for another process (WATCHDOG_PID) is not ours
    other = Notifier.from_environment({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "600000",
                                       "WATCHDOG_PID": "1"})
    assert other.enabled and other.watchdog_seconds is None
    # without a socket every call does nothing
    assert not Notifier.from_environment({}).enabled
    notifier.close()
    other.close()


def test_a_notify_socket_that_is_gone_is_said_once_and_the_daemon_collects(tmp_path: Path, caplog) -> None:
    from reaper.daemon.systemd import Notifier

    notifier = Notifier(str(tmp_path / "nobody-listens.sock"), 0.6)
    for _ in range(3):
        notifier.send("WATCHDOG=1")
    notifier.close()
    said = [r.getMessage() for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(said) == 1, said
