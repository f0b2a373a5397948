"""Measurement data and status are the operator's (issue 12 item 9): a real `reaper run` under umask 022
creates its files 0600 and its folders 0700 (the jsonfile sink's mode is configurable, for log shippers)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.pg


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wait_until(what: str, predicate, log: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the log:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)  # polling another process's files


def test_files_are_private_whatever_the_umask(pg15, tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"  # parents that do not exist yet: they are created private too
    out = tmp_path / "out" / "m.ndjson"
    shared = tmp_path / "shipped" / "m.ndjson"
    pidfile = tmp_path / "run" / "reaper.pid"
    config = tmp_path / "reaper.toml"
    config.write_text(f"""
[collector]
state_dir = "{state}"

[[sources]]
name = "main"
dsn = "{pg15.dsn()}"
metrics = {{ db_size = 1 }}

[[sinks]]
type = "jsonfile"
path = "{out}"

[[sinks]]
type = "jsonfile"
path = "{shared}"
file_mode = 0o640
""")
    log = tmp_path / "reaper.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "reaper.cli", "run", "--config", str(config),
                                 "--pidfile", str(pidfile)], stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: os.umask(0o022))
        try:
            wait_until("measurements and a status file",
                       lambda: out.exists() and out.stat().st_size > 0 and shared.exists()
                       and (state / "status.json").exists() and pidfile.exists(), log)
            assert mode(out) == 0o600 and mode(out.parent) == 0o700
            assert mode(shared) == 0o640 and mode(shared.parent) == 0o750  # readable by the shipper's group
            assert mode(state) == 0o700 and mode(state.parent) == 0o700
            assert mode(state / "status.json") == 0o600
            assert mode(pidfile) == 0o600
            spill_dirs = [p for p in state.rglob("*") if p.is_dir()]
            assert spill_dirs and all(mode(p) == 0o700 for p in spill_dirs), [(p, oct(mode(p))) for p in spill_dirs]
            files = [p for p in state.rglob("*") if p.is_file()]
            assert all(mode(p) & 0o077 == 0 for p in files), [(p, oct(mode(p))) for p in files]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
