"""SIGKILL at random instants while a real `reaper run` replays a spill into the postgres sink (issue 12 item 2).

A spill queue of known measurements is put where the daemon keeps its postgres sink's queue; the daemon
replays it into a storage database and is killed with SIGKILL at random instants, then started again.
After each restart the daemon must start (no crash on a half-committed queue), and at the end the storage
holds exactly the spilled measurements: none lost, none twice. 20 kills, as the issue asks, all of them
during the replay (seeded, so a failure can be replayed).
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from reaper.measurement import Measurement
from reaper.sinks.spill import SpillQueue

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]
KILLS = 20  # as the issue asks
MEASUREMENTS = 400000
SEED = 20241202


def wait_until(predicate: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def spill_directory(state: Path, label: str) -> Path:
    """Where the daemon keeps a sink's spill queue (reaper/daemon/sinkset.py: <slug>-<8 hex of sha1(label)>)."""
    return state / "spill" / f"{label}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"


def test_sigkill_at_random_instants_during_replay_stores_each_measurement_once(pg15, tmp_path: Path) -> None:
    store = f"store_{uuid.uuid4().hex[:8]}"
    pg15.psql(f"create database {store}")
    state = tmp_path / "state"
    spill = SpillQueue(spill_directory(state, "store"), 10**9)
    spill.open()
    base = time.time_ns() - MEASUREMENTS * 10**6  # recent: retention must not touch them
    for i in range(MEASUREMENTS):
        ns = base + i * 10**6
        spill.append(Measurement(source=f"s{i % 3}", metric="ping", table="ping", epoch_ns=ns,
                                 rows=({"epoch_ns": ns, "v": i},)))
    spill.close()
    config = tmp_path / "reaper.toml"
    config.write_text(f"""
[collector]
state_dir = "{state}"

[[sinks]]
type = "postgres"
name = "store"
dsn = "{pg15.dsn(dbname=store)}"
batching_delay_seconds = 0.01
batch_size = 100
retention_days = 0

[[sources]]
name = "idle"
dsn = "{pg15.dsn()}"
enabled = false
""")

    def stored() -> tuple[int, int]:
        if pg15.psql("select to_regclass('public.ping') is not null", dbname=store) != "t":
            return 0, 0
        total, distinct = pg15.psql("select count(*), count(distinct data->>'v') from public.ping",
                                    dbname=store).split("|")
        return int(total), int(distinct)

    rng = random.Random(SEED)
    logs: list[Path] = []

    def start() -> subprocess.Popen[bytes]:
        logs.append(tmp_path / f"reaper-{len(logs)}.log")
        with logs[-1].open("wb") as err:
            return subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                                    stderr=err)

    kills = 0
    proc = start()
    try:
        while kills < KILLS and stored()[1] < MEASUREMENTS:
            before = stored()[0]
            wait_until(lambda b=before, p=proc: stored()[0] > b or p.poll() is not None
                       or stored()[1] >= MEASUREMENTS, "replay progress")  # the replay is running ...
            assert proc.poll() is None, logs[-1].read_text()
            time.sleep(rng.uniform(0, 0.25))  # ... and is killed at a random instant of it
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
            total, distinct = stored()
            assert total == distinct, f"after kill {kills}: {total - distinct} measurements stored twice"
            proc = start()
        wait_until(lambda: stored()[1] >= MEASUREMENTS or proc.poll() is not None, "the whole spill stored",
                   limit=120)
        assert proc.poll() is None, logs[-1].read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert kills == KILLS, f"the replay finished after {kills} kills: make the spill larger"
    total, distinct = stored()
    assert (total, distinct) == (MEASUREMENTS, MEASUREMENTS)
    values = {int(v) for v in pg15.psql("select data->>'v' from public.ping", dbname=store).split()}
    assert values == set(range(MEASUREMENTS))
    text = "".join(p.read_text() for p in logs)
    assert "Traceback" not in text and "FileNotFoundError" not in text
