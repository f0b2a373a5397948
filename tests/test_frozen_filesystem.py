"""A jsonfile sink whose file system stops answering holds up that sink only (a real `reaper run`, a real file system).

A local file's write takes microseconds, so it was made from the trio thread itself, until the file system
stops answering: an NFS server gone, a file system frozen for a snapshot (fsfreeze, as LVM does), a dying disk.
Tried with an ext4 file system on a loop device, frozen with fsfreeze(8): the whole daemon stopped, every
source's ticks and the other sink with it (no row anywhere for the 8 s of the freeze). Each jsonfile sink now
writes from a thread of its own: the other sink's rows keep coming a second apart, `reaper status` says the
frozen one's write has not returned, and once the file system is back it catches up, nothing lost."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import REAPER, Daemon, wait_until

pytestmark = pytest.mark.pg
TOOLS = ("mkfs.ext4", "mount", "umount", "fsfreeze")


@pytest.fixture
def loop_fs(tmp_path: Path) -> Iterator[Path]:
    """An ext4 file system of its own, mounted from an image file under the test's directory."""
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS):
        pytest.skip("needs root and " + ", ".join(TOOLS))
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with image.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True, timeout=60)
    mnt.mkdir()
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, timeout=60).returncode:
        pytest.skip("cannot mount a loop device here")
    try:
        yield mnt
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, timeout=60)  # (thawed whatever happened)
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)


def epochs(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["data"][0]["epoch_ns"] for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.timeout(180)
def test_a_frozen_file_system_holds_up_its_own_sink_only_and_loses_nothing(pg15, fresh_db, loop_fs: Path,
                                                                           tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    frozen = loop_fs / "frozen.ndjson"
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)],
                        extra=f'\n[[sinks]]\ntype = "jsonfile"\npath = "{frozen}"\n')
    try:
        daemon.start()
        wait_until(lambda: len(epochs(frozen)) >= 2 and len(daemon.times("a")) >= 2, what="rows in both files")
        subprocess.run(["fsfreeze", "-f", str(loop_fs)], check=True, timeout=60)
        try:
            local_before = len(daemon.times("a"))

            def stuck() -> bool:
                status = daemon.fresh_status()
                sink = next(k for k in status.sinks if str(frozen) in k.label)
                return sink.error is not None and "a write has not returned" in sink.error

            wait_until(stuck, limit=60, what="the frozen sink's stuck write in the status")
            shown = subprocess.run([*REAPER, "status", "--config", str(daemon.config), "--format", "plain"],
                                   capture_output=True, text=True, timeout=60).stdout.splitlines()
            line = next(x.split("\t") for x in shown if x.startswith(f"sink\tjsonfile:{frozen}\t"))
            assert line[-1].startswith("a write has not returned for "), line  # (the status verb showed no reason)
            during = daemon.times("a")[local_before - 1:]
        finally:
            subprocess.run(["fsfreeze", "-u", str(loop_fs)], check=True, timeout=60)
        assert len(during) >= 10 and max(b - a for a, b in itertools.pairwise(during)) <= 1.5, during
        wait_until(lambda: set(epochs(daemon.out)) <= set(epochs(frozen)), limit=60,
                   what="the frozen sink catching up")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert set(epochs(daemon.out)) <= set(epochs(frozen))  # nothing lost
    assert len(epochs(frozen)) == len(set(epochs(frozen)))  # nothing twice
    assert "Traceback" not in daemon.log_text()


@pytest.mark.timeout(180)
def test_a_daemon_stuck_on_a_frozen_state_dir_stops_feeding_systemds_watchdog(pg15, fresh_db, loop_fs: Path,
                                                                              tmp_path: Path, monkeypatch) -> None:
    """The state dir (spill queues, the status file) is written from the trio loop: on a file system that stops
    answering the whole daemon waits. Under a unit with WatchdogSec= it is then killed and started again: its
    WATCHDOG=1 come from the loop, so they stop while it is stuck (and come again when the file system is back)."""
    import time

    from test_systemd_notify import FakeSystemd

    systemd = FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    daemon = Daemon(tmp_path)
    daemon.state = loop_fs / "state"
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)])
    pings: list[float] = []

    def pinged() -> float:
        pings.extend(time.monotonic() for _ in systemd.with_key("WATCHDOG")[len(pings):])
        return pings[-1] if pings else 0.0

    try:
        daemon.start()
        wait_until(lambda: len(daemon.times("a")) >= 2, what="rows")
        subprocess.run(["fsfreeze", "-f", str(loop_fs)], check=True, timeout=60)
        try:
            daemon.signal(signal.SIGUSR2)  # a status file written now: into the frozen state dir
            wait_until(lambda: time.monotonic() - pinged() > 2.0, limit=30, what="the keep-alives stopping")
        finally:
            subprocess.run(["fsfreeze", "-u", str(loop_fs)], check=True, timeout=60)
        stuck_since = pinged()
        wait_until(lambda: pinged() > stuck_since, what="the keep-alives again after the thaw")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        systemd.sock.close()
