"""A runaway metric (a custom query that returns millions of rows) against `[collector] max_rows_per_metric`,
from outside: a real `reaper run` on the pg15 fixture server. Without the limit, 3 million rows of one metric
took the process to 2 GB of RSS and held the source's other metrics up for 40 s."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from reaper.daemon.status import STATUS_FILE, read_status_file

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]
NOW = "(extract(epoch from now()) * 1e9)::int8 as epoch_ns"


def wait_until(predicate: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def metric(name: str, sql: str, extra: str = "") -> str:
    return f'[metrics.{name}]\ndescription = "{name}"\ngauges = ["*"]\n{extra}[metrics.{name}.sql]\n14 = "{sql}"\n'


def test_a_metric_over_max_rows_fails_alone_and_the_process_stays_small(pg15, tmp_path: Path) -> None:
    out = tmp_path / "out.ndjson"
    rows = "from generate_series(1, {n}) g"
    config = tmp_path / "reaper.toml"
    config.write_text(
        f'[collector]\nstate_dir = "{tmp_path / "state"}"\nmax_rows_per_metric = 1000\n\n'
        f'[[sinks]]\ntype = "jsonfile"\npath = "{out}"\n\n'
        + metric("ping", f"select {NOW}, 1 as v")
        + metric("exact", f"select {NOW}, g as v {rows.format(n=1000)}")  # at the limit: kept
        + metric("runaway", f"select {NOW}, g as v, md5(g::text) as tag_h {rows.format(n=3_000_000)}")
        # the same in a timed group (its own statement_timeout): the slow lane's combined statement
        + metric("runaway_timed", f"select {NOW}, g as v {rows.format(n=3_000_000)}",
                 "statement_timeout_seconds = 20\n")
        + f'\n[[sources]]\nname = "a"\ndsn = "{pg15.dsn()}"\n'
        'metrics = { ping = 1, exact = 2, runaway = 2, runaway_timed = 2 }\n')

    def lines(name: str) -> list[dict]:
        if not out.exists():
            return []
        return [d for d in map(json.loads, out.read_text().splitlines()) if d["metric"] == name]

    log = tmp_path / "reaper.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    peak = 0
    try:
        def progressed() -> bool:
            nonlocal peak
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
            return proc.poll() is not None or (len(lines("ping")) >= 8 and len(lines("exact")) >= 3)

        wait_until(progressed, "the other metrics' rows")
        assert proc.poll() is None, log.read_text()
        status = read_status_file(tmp_path / "state" / STATUS_FILE)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text
    assert all(len(d["data"]) == 1000 for d in lines("exact"))
    assert lines("runaway") == [] and lines("runaway_timed") == []
    for name in ("runaway", "runaway_timed"):
        errors = [line for line in text.splitlines() if f"metric {name}: failed" in line]
        assert len(errors) == 1, text  # once, not once per run
        assert "returned more than 1000 rows ([collector] max_rows_per_metric = 1000); none kept" in errors[0]
    source = next(s for s in status.sources if s.name == "a")
    assert source.metric_errors >= 2 and {"runaway", "runaway_timed"} <= set(source.degraded)
    # a second's samples stay a second apart: the runaway metrics held the statement up for no time
    times = [d["data"][0]["epoch_ns"] / 1e9 for d in lines("ping")]
    assert max(b - a for a, b in itertools.pairwise(times)) < 3.0, times
    assert peak < 200e6, f"RSS peaked at {peak / 1e6:.0f} MB"
