"""A connection flood on the Prometheus endpoint cannot take the sources' file handles (issue 12 item 12).

A real `reaper run` with only 256 file handles (soft and hard, so nothing can raise it), a source
collecting every second, and ~2000 connects in a few seconds from this test (loopback, at most 400
held open at once): the source's measurements keep arriving, the endpoint still answers afterwards,
the log has no traceback and at most a line a minute about accepting.
"""

from __future__ import annotations

import collections
import json
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REAPER = [sys.executable, "-m", "reaper.cli"]
FILE_LIMIT = 256
FLOOD_CONNECTS = 2000
FLOOD_HELD = 400  # more than the daemon's whole file budget


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


def db_stats_epochs(path: Path) -> list[int]:
    if not path.exists():
        return []
    epochs = []
    for line in path.read_text().splitlines():
        if line.endswith("}"):
            doc = json.loads(line)
            if doc["metric"] == "db_stats":
                epochs.append(int(doc["data"][0]["epoch_ns"]))
    return epochs


def scrape(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        response.read()
        return int(response.status)


def flood(port: int, seconds: float) -> int:
    """Open connects as fast as possible for `seconds` (at most FLOOD_CONNECTS), holding the last
    FLOOD_HELD open; returns how many were attempted."""
    held: collections.deque[socket.socket] = collections.deque()
    attempted = 0
    deadline = time.monotonic() + seconds
    try:
        while attempted < FLOOD_CONNECTS and time.monotonic() < deadline:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))  # EINPROGRESS, or refused once the backlog is full
            held.append(s)
            attempted += 1
            while len(held) > FLOOD_HELD:
                held.popleft().close()
            if attempted % 100 == 0:
                time.sleep(0.01)  # ~2000 in a few seconds, not in one burst
    finally:
        for s in held:
            s.close()
    return attempted


@pytest.mark.pg
def test_a_connection_flood_does_not_starve_the_sources(pg15, fresh_db, tmp_path: Path) -> None:
    out = tmp_path / "out.ndjson"
    port = free_port()
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n\n'
                      f'[[sources]]\nname = "main"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\npreset = "minimal"\n'
                      'metrics = { db_stats = 1 }\n\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{out}"\n\n'
                      f'[[sinks]]\ntype = "prometheus"\nlisten = "127.0.0.1:{port}"\n')
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=low_file_limit)
    try:
        deadline = time.monotonic() + 60
        up = False
        while time.monotonic() < deadline and not (up and len(db_stats_epochs(out)) >= 2):
            try:
                up = scrape(url) == 200
            except OSError:
                time.sleep(0.1)
            time.sleep(0.1)
        assert up and len(db_stats_epochs(out)) >= 2, "the daemon did not start collecting"

        flood_start = time.time_ns()
        attempted = flood(port, seconds=8)
        flood_end = time.time_ns()
        assert attempted >= 1000

        # collection went on through the flood: about one db_stats a second
        deadline = time.monotonic() + 30
        during: list[int] = []
        expected = int((flood_end - flood_start) / 1e9) - 2
        while time.monotonic() < deadline:
            during = [e for e in db_stats_epochs(out) if flood_start <= e <= flood_end]
            if len(during) >= expected:
                break
            time.sleep(0.2)
        assert len(during) >= expected, (len(during), expected)
        # and the endpoint still answers once the flood is over
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and status != 200:
            try:
                status = scrape(url)
            except OSError:
                time.sleep(0.2)
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "Too many open files" not in stderr.replace("cannot accept a connection", ""), stderr[-3000:]
    assert stderr.count("cannot accept a connection") <= 2


def test_run_raises_the_soft_open_files_limit_to_the_hard_one() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves no room")
    code = ("import logging, resource; logging.basicConfig(level='INFO'); "
            "from reaper.cli.limits import raise_open_files_limit; "
            "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=preexec)
    assert proc.returncode == 0, proc.stderr
    if hard == resource.RLIM_INFINITY:
        assert proc.stdout.split()[-1] == "256"
    else:
        assert proc.stdout.strip() == f"(256, {hard}) {hard}"
        assert f"open files limit raised from 256 to {hard}" in proc.stderr
