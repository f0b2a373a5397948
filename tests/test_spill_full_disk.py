"""A full spill disk, from outside (issue 12 item 1): a real `reaper run` whose state dir is a 2 MB tmpfs,
ten sources at 1 s, and a storage that is down long enough to fill the disk.

Before the fix: `No space left on device` was logged but status kept `dropped: 0`; when the storage
came back the daemon exited 1 from the spill's commit (it needed free space to save its position), and
every restart failed within a second on a torn record. Wanted, and checked here: the drops are counted
in status, the daemon stays up and delivers again when the storage returns, and it restarts cleanly on
the same (still nearly full) disk.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import PgServer

pytestmark = pytest.mark.pg

SOURCES = 10
ROW_BYTES = 4000  # each source's measurement carries ~20 KB: the 2 MB disk fills in seconds
FAT_SQL = ("select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, g as n, "
           f"repeat('x', {ROW_BYTES}) as pad from generate_series(1, 5) g")


@pytest.fixture
def state_tmpfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "state"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def storage() -> Iterator[PgServer]:
    with PgServer.create(major=15) as server:
        yield server


def wait_until(what: str, predicate, log: Path, limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the log:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)  # polling another process's state


def status(state: Path) -> dict:
    try:
        return json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def sink_status(state: Path) -> dict:
    sinks = [s for s in status(state).get("sinks", []) if s["label"].startswith("postgres")]
    return sinks[0] if sinks else {}


def stored(storage: PgServer) -> int:
    try:
        return int(storage.psql("select count(*) from fat") or 0)
    except Exception:
        return 0


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen([sys.executable, "-m", "reaper.cli", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_a_full_spill_disk_is_counted_survived_and_restartable(pg15, storage: PgServer, state_tmpfs: Path,
                                                               tmp_path: Path) -> None:
    sources = "".join(f"""
[[sources]]
name = "s{i}"
dsn = "{pg15.dsn()}"
metrics = {{ fat = 1 }}
""" for i in range(SOURCES))
    config = tmp_path / "reaper.toml"
    config.write_text(f"""
[collector]
state_dir = "{state_tmpfs}"
shutdown_grace_seconds = 5

[metrics.fat]
description = "wide rows, to fill the spill disk quickly"
sql = {{ 14 = "{FAT_SQL}" }}
{sources}
[[sinks]]
type = "postgres"
dsn = "{storage.dsn()}"
batching_delay_seconds = 0.2
write_timeout_seconds = 5
""")
    log = tmp_path / "reaper.log"
    storage.stop()
    proc = start(config, log)
    try:
        # the storage is down: measurements spill until the disk is full, then drops are counted
        wait_until("counted drops", lambda: sink_status(state_tmpfs).get("dropped", 0) > 0, log)
        assert proc.poll() is None, log.read_text()
        assert "No space left on device" in log.read_text() or "full" in log.read_text()
        # the storage returns: the daemon stays up and delivers again
        storage.start()
        wait_until("rows in the storage", lambda: stored(storage) > 0, log)
        before = stored(storage)
        wait_until("more rows (live collection again)", lambda: stored(storage) > before, log)
        assert proc.poll() is None, log.read_text()
        assert stop(proc) == 0, log.read_text()[-4000:]
        # and it starts again on the same disk (the spill's head and segments are consistent)
        storage.stop()
        again = start(config, log)
        try:
            wait_until("a status file from the restarted daemon",
                       lambda: status(state_tmpfs).get("pid") == again.pid, log)
            assert again.poll() is None, log.read_text()[-4000:]
        finally:
            assert stop(again) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-6000:]
