"""A sink whose file cannot be created never stops the daemon (issue 11 bug 2 and Build 3), from outside.

Real `reaper run` processes against the pg15 fixture server: a jsonfile sink under a regular file and one
under /proc (and named pipes whose reader lags or never comes). The daemon starts (or stays up when such
a sink arrives by SIGHUP), the healthy sink gets every measurement, the bad sink's one line is in the log
and its error in the status file, and `reaper check` names the bad paths.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import freshstatus
import pytest

from reaper.daemon.status import STATUS_FILE, read_status_file

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]
PING = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, 1 as v"
PROC_PATH = "/proc/reaper-test/x.ndjson"


def wait_until(predicate: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def write_config(tmp: Path, dsn: str, *bad_paths: str) -> Path:
    sinks = "".join(f'\n[[sinks]]\ntype = "jsonfile"\npath = "{p}"\n' for p in bad_paths)
    config = tmp / "reaper.toml"
    config.write_text(f"""
[collector]
state_dir = "{tmp / 'state'}"

[[sinks]]
type = "jsonfile"
path = "{tmp / 'good.ndjson'}"
{sinks}
[metrics.ping]
description = "ping"
gauges = ["*"]
columns = ["epoch_ns", "v"]
[metrics.ping.sql]
14 = "{PING}"

[[sources]]
name = "a"
dsn = "{dsn}"
metrics = {{ ping = 1 }}
""")
    return config


def good_lines(tmp: Path) -> int:
    path = tmp / "good.ndjson"
    return len(path.read_text().splitlines()) if path.exists() else 0


def sink_errors(tmp: Path) -> dict[str, str | None]:
    try:
        status = read_status_file(tmp / "state" / STATUS_FILE)
    except (OSError, ValueError):
        return {}
    return {s.label: s.error for s in status.sinks}


@pytest.fixture
def bad_parent(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("a regular file, not a folder\n")
    return str(tmp_path / "file" / "x.ndjson")


def test_check_names_each_path_that_cannot_be_created(pg15, tmp_path: Path, bad_parent: str) -> None:
    config = write_config(tmp_path, pg15.dsn(), bad_parent, PROC_PATH)  # (a directory: the config check's)
    done = subprocess.run([*REAPER, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert f"sink jsonfile:{bad_parent}: cannot open {bad_parent}: {tmp_path / 'file'} is not a directory" in lines[0]
    assert f"sink jsonfile:{PROC_PATH}: cannot open {PROC_PATH}: proc is a kernel file system" in lines[1]


def test_run_starts_with_sinks_that_cannot_open_and_the_others_receive(pg15, tmp_path: Path,
                                                                      bad_parent: str) -> None:
    config = write_config(tmp_path, pg15.dsn(), bad_parent, PROC_PATH)
    log = tmp_path / "reaper.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: good_lines(tmp_path) >= 3 or proc.poll() is not None, "the healthy sink's rows")
        assert proc.poll() is None, log.read_text()
        wait_until(lambda: log.read_text().count("cannot open") >= 2, "the bad sinks' lines")
        seen = good_lines(tmp_path)
        wait_until(lambda: good_lines(tmp_path) >= seen + 2, "more rows: the bad sinks hold up nothing")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    not_a_dir = f"{tmp_path / 'file'} is not a directory"
    for path, why in ((bad_parent, not_a_dir), (PROC_PATH, "No such file or directory")):
        lines = [line for line in text.splitlines() if f"cannot open {path}" in line]
        assert len(lines) == 1, lines  # one line, not one per retry
        assert f"sink jsonfile:{path}: cannot open {path}: {why}; retrying every 30s at most, measurements spill " \
               "meanwhile" in lines[0]
    assert {json.loads(line)["dbname"] for line in (tmp_path / "good.ndjson").read_text().splitlines()} == {"a"}


def test_a_reload_that_adds_a_sink_that_cannot_open_keeps_the_daemon_up(pg15, tmp_path: Path,
                                                                       bad_parent: str) -> None:
    config = write_config(tmp_path, pg15.dsn())
    log = tmp_path / "reaper.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: good_lines(tmp_path) >= 2 or proc.poll() is not None, "the first rows")
        write_config(tmp_path, pg15.dsn(), bad_parent, PROC_PATH)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log.read_text().count("cannot open") >= 2 or proc.poll() is not None,
                   "the bad sinks' lines")
        assert proc.poll() is None, log.read_text()
        before = good_lines(tmp_path)
        wait_until(lambda: good_lines(tmp_path) >= before + 2, "rows after the reload")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


def test_the_status_file_says_why_a_sink_is_not_writing(pg15, tmp_path: Path, bad_parent: str) -> None:
    config = write_config(tmp_path, pg15.dsn(), bad_parent, PROC_PATH)
    with (tmp_path / "reaper.log").open("wb") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: all(sink_errors(tmp_path).get(f"jsonfile:{p}") for p in (bad_parent, PROC_PATH)),
                   "the bad sinks' errors in the status file")
        errors = sink_errors(tmp_path)
        assert errors[f"jsonfile:{bad_parent}"] == f"cannot open {bad_parent}: {tmp_path / 'file'} is not a directory"
        assert errors[f"jsonfile:{PROC_PATH}"] == f"cannot open {PROC_PATH}: No such file or directory"
        assert errors[f"jsonfile:{tmp_path / 'good.ndjson'}"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_reload_reports_a_new_prometheus_sink_whose_port_is_taken_and_the_daemon_stays_up(pg15,
                                                                                         tmp_path: Path) -> None:
    """Issue 12 item 6: a reload whose new sink cannot start (its port is in use) is applied like any other;
    the daemon stays up, `reaper reload` says what it did, and the status file says why the sink is not
    writing."""
    import socket

    config = write_config(tmp_path, pg15.dsn())
    pidfile = tmp_path / "reaper.pid"
    log = tmp_path / "reaper.log"
    with socket.socket() as taken, log.open("wb") as err:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config), "--pidfile", str(pidfile)],
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_until(lambda: good_lines(tmp_path) >= 2 or proc.poll() is not None, "the first rows")
            with config.open("a") as f:
                f.write(f'\n[[sinks]]\ntype = "prometheus"\nlisten = "127.0.0.1:{port}"\n')
            done = subprocess.run([*REAPER, "reload", "--config", str(config), "--pidfile", str(pidfile)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "prometheus" in done.stdout and "added" in done.stdout, done.stdout
            label = f"prometheus:127.0.0.1:{port}"
            wait_until(lambda: bool(sink_errors(tmp_path).get(label)), "the prometheus sink's error in status")
            assert "Address already in use" in sink_errors(tmp_path)[label]
            before = good_lines(tmp_path)
            wait_until(lambda: good_lines(tmp_path) >= before + 2, "rows after the reload")
            assert proc.poll() is None, log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


def test_a_prometheus_sink_whose_port_is_taken_at_start_serves_once_freed_and_never_holds_up_a_stop(
        pg15, tmp_path: Path) -> None:
    """Two Prometheus sinks whose ports another program holds at start: the daemon starts, each sink's
    error is one log line naming it once; the port freed, that sink listens and serves the latest rows
    (kept meanwhile); SIGTERM while the other still cannot listen ends the daemon without waiting out the
    shutdown grace for it (it has nothing to save: Prometheus keeps only the latest values)."""
    import socket
    import urllib.request

    config = write_config(tmp_path, pg15.dsn())
    config.write_text(config.read_text().replace("[collector]\n", "[collector]\nshutdown_grace_seconds = 60\n"))
    log = tmp_path / "reaper.log"
    with socket.socket() as freed, socket.socket() as held, log.open("wb") as err:
        for s in (freed, held):
            s.bind(("127.0.0.1", 0))
            s.listen()
        ports = [s.getsockname()[1] for s in (freed, held)]
        with config.open("a") as f:
            for port in ports:
                f.write(f'\n[[sinks]]\ntype = "prometheus"\nlisten = "127.0.0.1:{port}"\n')
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
        try:
            labels = [f"prometheus:127.0.0.1:{port}" for port in ports]
            wait_until(lambda: all(sink_errors(tmp_path).get(label) for label in labels) or proc.poll() is not None,
                       "both sinks' errors in the status file")
            wait_until(lambda: good_lines(tmp_path) >= 3 or proc.poll() is not None, "the healthy sink's rows")
            for label in labels:
                lines = [line for line in log.read_text().splitlines() if label in line]
                assert len(lines) == 1, lines
                assert lines[0].count(label) == 1 and "Address already in use" in lines[0], lines
            freed.close()

            def scraped() -> str:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=5) as r:
                        return r.read().decode()
                except OSError:
                    return ""
            wait_until(lambda: "pgwatch_ping_v{" in scraped() or proc.poll() is not None, "the freed sink's rows",
                       limit=60)
            assert proc.poll() is None, log.read_text()
            wait_until(lambda: sink_errors(tmp_path)[labels[0]] is None, "the freed sink's error cleared in status",
                       limit=90)
            assert "Address already in use" in (sink_errors(tmp_path)[labels[1]] or "")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "did not finish" not in text and "Traceback" not in text, text


def test_a_named_pipe_whose_reader_lags_holds_up_only_its_own_sink(pg15, tmp_path: Path) -> None:
    """jsonfile sinks at named pipes (output piped into another program): one whose reader stopped reading (its
    pipe is full, so a write blocks) and one nobody opened for reading (its open blocks). The daemon goes on
    collecting into the healthy sink, and SIGTERM ends it within the shutdown grace."""
    lagging, nobody = tmp_path / "lagging.fifo", tmp_path / "nobody.fifo"
    os.mkfifo(lagging)
    os.mkfifo(nobody)
    reader = os.open(lagging, os.O_RDONLY | os.O_NONBLOCK)  # the lagging consumer: it opened and reads no more
    filler = os.open(lagging, os.O_WRONLY | os.O_NONBLOCK)
    try:
        for chunk in (65536, 4096, 1):  # to the brim: reaper's next write blocks
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(filler, b"x" * chunk)
        config = write_config(tmp_path, pg15.dsn(), str(lagging), str(nobody))
        config.write_text(config.read_text().replace("[collector]\n", "[collector]\nshutdown_grace_seconds = 3\n"))
        log = tmp_path / "reaper.log"
        with log.open("wb") as err:
            proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_until(lambda: good_lines(tmp_path) >= 3 or proc.poll() is not None, "the healthy sink's rows")
            seen = good_lines(tmp_path)
            wait_until(lambda: good_lines(tmp_path) >= seen + 3 or proc.poll() is not None,
                       "more rows while both pipes are stuck")
            assert proc.poll() is None, log.read_text()
        finally:
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"SIGTERM did not end the daemon: {log.read_text()}") from None
        assert time.monotonic() - stopped_at < 20, "the stop waited for the stuck pipes beyond the grace"
        text = log.read_text()
        assert proc.returncode == 0, text
        assert "Traceback" not in text
    finally:
        os.close(filler)
        os.close(reader)


def test_a_reload_that_fixes_a_sinks_path_delivers_what_the_broken_one_spilled(pg15, tmp_path: Path) -> None:
    """The usual fix of a bad sink path: edit it and reload. The reload removes the broken sink and adds the fixed
    one; the fixed one takes over what the broken one spilled meanwhile, so the file holds every tick from the
    first (it used to stay stranded in the old sink's spill folder, unsaid). A sink removed for good leaves its
    backlog on disk, and the next start says so."""
    config = write_config(tmp_path, pg15.dsn())
    text = config.read_text()
    good = str(tmp_path / "good.ndjson")
    config.write_text(text.replace(good, PROC_PATH))
    pidfile, log = tmp_path / "reaper.pid", tmp_path / "reaper.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config), "--pidfile", str(pidfile)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        def spilled() -> int:
            status = freshstatus.polled(proc.pid, tmp_path / "state")
            return sum(s.spilled for s in status.sinks) if status is not None else 0
        wait_until(lambda: spilled() >= 4 or proc.poll() is not None, "the broken sink's spill")
        config.write_text(text)
        reloaded_at = time.time()
        done = subprocess.run([*REAPER, "reload", "--config", str(config), "--pidfile", str(pidfile)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(lambda: good_lines(tmp_path) >= 8, "rows in the fixed file")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    times = sorted(json.loads(line)["data"][0]["epoch_ns"] / 1e9 for line in Path(good).read_text().splitlines())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] < reloaded_at - 3, (times[0], reloaded_at)  # the ticks before the fix (4 spilled) are there
    assert len(times) >= 8 and max(gaps) < 2.5, gaps  # every second from the first tick: nothing stranded
    assert "takes over the" in log.read_text()
    # the sink removed for good (no sink of its type added): its backlog stays, and a start says where
    config.write_text(text.replace(good, PROC_PATH))
    with log.open("wb") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: spilled() >= 2 or proc.poll() is not None, "the broken sink's spill again")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    prometheus = 'type = "prometheus"\nlisten = "127.0.0.1:0"'
    config.write_text(text.replace(f'type = "jsonfile"\npath = "{good}"', prometheus))
    with log.open("wb") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: "of a sink no longer configured" in log.read_text() or proc.poll() is not None,
                   "the warning about the stranded spill")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()
