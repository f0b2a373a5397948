"""One event is one log line, whatever text it quotes (issue 12 item 13: log injection).

Names in the config cannot hold control characters (tests/test_config_validation.py), but a discovered
database name, a server's error text or a file name can. A real `reaper run` discovers a database named
with a newline and a forged log line inside it: the forged text stays inside its own, escaped line.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pgserver import quote_ident

pytestmark = pytest.mark.pg

FORGED = "2026-01-01T00:00:00.000Z ERROR   reaper.forged: everything is on fire"


def wait_until(predicate, log: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out; the log:\n" + log.read_text())
        time.sleep(0.1)  # polling a condition across processes, not synchronising on time


def test_a_database_named_with_a_newline_cannot_forge_a_log_line(pg15, tmp_path: Path) -> None:
    prefix = f"t_log_{uuid.uuid4().hex[:6]}_"
    evil = f"{prefix}x\n{FORGED}"
    pg15.psql(f"create database {quote_ident(evil)}")
    config = tmp_path / "reaper.toml"
    config.write_text(f"""
[collector]
state_dir = "{tmp_path / 'state'}"

[[sources]]
name = "inst"
kind = "postgres-discovery"
dsn = "{pg15.dsn()}"
include_pattern = "^{prefix}"
discovery_interval_seconds = 1
metrics = {{ db_size = 1 }}

[[sinks]]
type = "jsonfile"
path = "{tmp_path / 'out.ndjson'}"
""")
    log = tmp_path / "reaper.log"
    try:
        with log.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "reaper.cli", "run", "--config", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                wait_until(lambda: "forged" in log.read_text() and (tmp_path / "out.ndjson").exists()
                           and (tmp_path / "out.ndjson").stat().st_size > 0, log)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        lines = log.read_text().splitlines()
        assert not any(line.startswith(FORGED[:24]) for line in lines), lines
        quoting = [line for line in lines if "forged" in line]
        assert quoting and all("\\n" + FORGED[:10] in line for line in quoting), quoting
    finally:
        pg15.psql(f"drop database if exists {quote_ident(evil)} with (force)")
