"""A storage outage and a SIGKILL while spilling, with the real daemon: nothing collected is lost.

A jsonfile sink beside the postgres sink is the record of what was collected; after the storage
server comes back (and reaper is restarted), every measurement in that record is in the storage.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import freshstatus
import pytest
from pgserver import PgServer

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]
PING = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, 1 as v"
OUTAGE_SECONDS = 60  # the acceptance: storage down for a minute


def wait_until(predicate: Callable[[], bool], limit: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def storage() -> Iterator[PgServer]:
    with PgServer.create(major=15) as server:
        yield server


class Run:
    def __init__(self, tmp: Path, source_dsn: str, storage_dsn: str) -> None:
        self.tmp, self.state, self.out = tmp, tmp / "state", tmp / "record.ndjson"
        self.config = tmp / "reaper.toml"
        self.config.write_text(f"""
[collector]
state_dir = "{self.state}"
queue_capacity = 50

[[sinks]]
type = "jsonfile"
path = "{self.out}"

[[sinks]]
type = "postgres"
dsn = "{storage_dsn}"
batching_delay_seconds = 0.2
connect_timeout_seconds = 2
write_timeout_seconds = 5

[metrics.ping]
description = "ping"
gauges = ["*"]
columns = ["epoch_ns", "v"]
[metrics.ping.sql]
14 = "{PING}"

[[sources]]
name = "a"
dsn = "{source_dsn}"
metrics = {{ ping = 1 }}

[[sources]]
name = "b"
dsn = "{source_dsn}"
metrics = {{ ping = 1 }}
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        log = self.tmp / f"reaper-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as f:
            self.proc = subprocess.Popen([*REAPER, "run", "--config", str(self.config)], stdout=subprocess.DEVNULL,
                                         stderr=f)

    def status(self):
        """The status file now, after asking the daemon for a fresh one (throttled)."""
        return freshstatus.polled(self.proc.pid if self.proc is not None else None, self.state)

    def recorded(self) -> set[tuple[str, int]]:
        if not self.out.exists():
            return set()
        docs = [json.loads(line) for line in self.out.read_text().splitlines() if line.endswith("}")]
        return {(d["dbname"], d["data"][0]["epoch_ns"]) for d in docs if d["metric"] == "ping"}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


def stored(storage: PgServer) -> set[tuple[str, int]]:
    exists = storage.psql("select to_regclass('public.ping') is not null")
    if exists != "t":
        return set()
    rows = storage.psql("select dbname, data->>'epoch_ns' from public.ping")
    return {(line.split("|")[0], int(line.split("|")[1])) for line in rows.splitlines() if line}


def test_storage_down_then_sigkill_while_spilling_loses_nothing(pg15, storage: PgServer, tmp_path: Path) -> None:
    run = Run(tmp_path, pg15.dsn(), storage.dsn())
    run.start()
    try:
        wait_until(lambda: len(stored(storage)) >= 4, what="the first rows in the storage")
        storage.stop()
        down_at = time.monotonic()
        wait_until(lambda: (st := run.status()) is not None and any(k.spilled > 0 for k in st.sinks),
                   what="the postgres sink spilling")
        while time.monotonic() - down_at < OUTAGE_SECONDS / 2:
            time.sleep(0.5)
        run.stop(signal.SIGKILL)  # killed while spilling: what is on disk must survive
        run.start()  # a new process: replays the spill once the storage is back
        while time.monotonic() - down_at < OUTAGE_SECONDS:
            time.sleep(0.5)
        storage.start()
        wait_until(lambda: (st := run.status()) is not None and st.pid == run.proc.pid
                   and all(k.spill_bytes == 0 and k.queued == 0 for k in st.sinks), limit=90,
                   what="the spill replayed")
        recorded = run.recorded()
        wait_until(lambda: recorded <= stored(storage), limit=30, what="every recorded measurement stored")
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.stop()
    # collection never paused: one row per second per source, through the outage and the restart
    times = sorted(t for src, t in recorded if src == "a")
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(times)]
    assert len(times) >= OUTAGE_SECONDS
    assert sorted(gaps)[-2] < 2.5  # the largest gap is the restart itself
    logs = "".join(p.read_text() for p in run.logs)
    assert "spill queue" in logs and "Traceback" not in logs


def test_sigterm_while_the_storage_is_down_stops_at_once_and_the_next_start_stores_everything(
        pg15, storage: PgServer, tmp_path: Path) -> None:
    """SIGTERM while the postgres sink cannot write: its backlog is in the spill already, so the daemon stops
    without retrying the storage until the shutdown grace runs out (it used to: a systemd stop took the whole
    grace); the next start, with the storage back, stores every measurement collected."""
    run = Run(tmp_path, pg15.dsn(), storage.dsn())
    text = run.config.read_text()
    run.config.write_text(text.replace("[collector]\n", "[collector]\nshutdown_grace_seconds = 120\n"))
    run.start()
    try:
        wait_until(lambda: len(stored(storage)) >= 2, what="the first rows in the storage")
        storage.stop()
        wait_until(lambda: (st := run.status()) is not None and any(k.spilled >= 6 for k in st.sinks),
                   what="the postgres sink spilling")
        run.stop()  # waits at most 30 s: far less than the grace
        assert run.proc is not None and run.proc.returncode == 0
        first_log = run.logs[-1].read_text()
        assert "did not finish" not in first_log, first_log
        storage.start()
        run.start()
        recorded = run.recorded()
        wait_until(lambda: recorded <= stored(storage), limit=60, what="every recorded measurement stored")
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.stop()
    assert "Traceback" not in "".join(p.read_text() for p in run.logs)
