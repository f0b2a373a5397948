"""The real daemon (`reaper run` as a process) signalled with real SIGHUP/SIGTERM, against PostgreSQL 15."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import freshstatus
import pytest
from pgserver import quote_ident

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]
PING = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, 1 as v"


def wait_until(predicate: Callable[[], bool], limit: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Daemon:
    """A `reaper run` process with its config, state dir, output file and log."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "reaper.toml"
        self.state = tmp / "state"
        self.out = tmp / "out.ndjson"
        self.log = tmp / "reaper.log"
        self.pidfile = tmp / "reaper.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, sources: list[tuple[str, str, int]], extra: str = "") -> None:
        text = [f'[collector]\nstate_dir = "{self.state}"\nshutdown_grace_seconds = 10\n',
                f'[[sinks]]\ntype = "jsonfile"\npath = "{self.out}"\n',
                f'[metrics.ping]\ndescription = "ping"\ngauges = ["*"]\n[metrics.ping.sql]\n14 = "{PING}"\n']
        for name, dsn, interval in sources:
            text.append(f'[[sources]]\nname = "{name}"\ndsn = "{dsn}"\nmetrics = {{ ping = {interval} }}\n'
                        f'connect_timeout_seconds = 2\n')
        self.config.write_text("\n".join(text) + extra)

    def start(self) -> None:
        with self.log.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([*REAPER, "run", "--config", str(self.config), "--pidfile",
                                          str(self.pidfile)], stdout=subprocess.DEVNULL, stderr=log)
        wait_until(lambda: self.status() is not None, what="the daemon's status file")

    def status(self):
        """The status file now, after asking the daemon for a fresh one (throttled: for polling loops)."""
        return freshstatus.polled(self.proc.pid if self.proc is not None else None, self.state)

    def fresh_status(self):
        """A status written after this call asked for it (SIGUSR2, as `reaper status` does)."""
        assert self.proc is not None
        return freshstatus.fresh(self.proc.pid, self.state)

    def lines(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.endswith("}")]

    def times(self, source: str) -> list[float]:
        return [d["data"][0]["epoch_ns"] / 1e9 for d in self.lines() if d["dbname"] == source]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def reload(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*REAPER, "reload", "--config", str(self.config)],  # (the status file's pid)
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """For a test's `finally`: the daemon gone and reaped (an unreaped Popen warns in a later test)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    d.kill()


@pytest.fixture
def three_dbs(pg15) -> Iterator[list[str]]:
    names = [f"t_reload_{i}_{os.getpid()}_{time.monotonic_ns() % 10**6}" for i in range(3)]
    for n in names:
        pg15.psql(f"create database {quote_ident(n)}")
    yield names
    for n in names:
        pg15.psql(f"drop database if exists {quote_ident(n)} with (force)")


def reaper_connections(pg15, datname: str) -> int:
    return int(pg15.psql(f"select count(*) from pg_stat_activity where application_name = 'reaper' "
                         f"and datname = '{datname}'"))


def max_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def test_reload_removes_updates_and_keeps_sources_without_gaps(pg15, three_dbs, daemon: Daemon) -> None:
    a, b, c = three_dbs
    daemon.write_config([("a", pg15.dsn(dbname=a), 1), ("b", pg15.dsn(dbname=b), 1), ("c", pg15.dsn(dbname=c), 1)])
    daemon.start()
    wait_until(lambda: all(len(daemon.times(s)) >= 3 for s in "abc"), what="three sources collecting")
    assert reaper_connections(pg15, a) == 1
    # a removed, b's interval changed (1 s -> 2 s), c unchanged
    daemon.write_config([("b", pg15.dsn(dbname=b), 2), ("c", pg15.dsn(dbname=c), 1)])
    reloaded_at = time.time()
    answer = daemon.reload()
    assert answer.returncode == 0, answer.stderr
    assert "reload applied" in answer.stdout
    wait_until(lambda: len([t for t in daemon.times("b") if t > reloaded_at]) >= 3, what="b after the reload")
    assert daemon.stop() == 0
    assert reaper_connections(pg15, a) == 0  # the removed source's connection is gone
    assert not [t for t in daemon.times("a") if t > reloaded_at + 1]
    around = reloaded_at - 3
    c_times = [t for t in daemon.times("c") if t > around]
    b_times = [t for t in daemon.times("b") if t > around]
    assert max_gap(c_times) < 1.5  # unchanged: no missed tick
    assert max_gap(b_times) < 2.5  # updated in place: no gap longer than its (new) interval
    after = [t for t in daemon.times("b") if t > reloaded_at + 2.5]
    assert all(1.5 < g < 2.5 for g in (y - x for x, y in itertools.pairwise(after)))
    log = daemon.log_text()
    assert "1 removed" in log and "1 updated" in log and "1 unchanged" in log
    assert log.count("source b: connected") == 1  # updated without a reconnect


def test_invalid_config_on_sighup_keeps_collecting_and_reports_each_problem(pg15, fresh_db, daemon) -> None:
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)])
    daemon.start()
    wait_until(lambda: len(daemon.times("a")) >= 2, what="collection")
    daemon.config.write_text(daemon.config.read_text() + '\n[[sources]]\nname = "a"\ndsn = "nope"\n'
                             'metrics = { no_such = 1 }\n')
    answer = daemon.reload()
    assert answer.returncode == 1 and "rejected" in answer.stderr
    seen = len(daemon.times("a"))
    wait_until(lambda: len(daemon.times("a")) >= seen + 2, what="collection after the rejected reload")
    assert daemon.stop() == 0
    log = daemon.log_text()
    problems = [line for line in log.splitlines() if "reload: " in line and str(daemon.config) + ":" in line]
    assert len(problems) == 3, log  # duplicate name, bad dsn, unknown metric: one line each
    assert "Traceback" not in log


def test_a_burst_of_sighups_leaves_the_process_healthy(pg15, fresh_db, daemon: Daemon) -> None:
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1), ("b", pg15.dsn(dbname=fresh_db), 1)])
    daemon.start()
    wait_until(lambda: len(daemon.times("a")) >= 2 and len(daemon.times("b")) >= 2, what="collection")
    tasks_before = daemon.fresh_status().tasks
    for _ in range(50):
        daemon.signal(signal.SIGHUP)
        time.sleep(0.02)
    reloads = lambda: daemon.status().reloads  # noqa: E731
    wait_until(lambda: reloads() >= 1, what="a reload")
    status = daemon.fresh_status()  # written by the periodic writer after the burst was handled
    assert 1 <= status.reloads <= 50 and status.reload_failures == 0
    assert status.tasks == tasks_before
    assert reaper_connections(pg15, fresh_db) == 2
    seen = len(daemon.times("a"))
    wait_until(lambda: len(daemon.times("a")) >= seen + 2, what="collection after the burst")
    assert daemon.stop() == 0


def test_one_blackholed_source_among_five_does_not_delay_the_others(pg15, fresh_db, daemon: Daemon) -> None:
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    try:
        sources = [(f"s{i}", pg15.dsn(dbname=fresh_db), 1) for i in range(4)]
        sources.append(("hole", f"postgresql://x@127.0.0.1:{hole.getsockname()[1]}/db", 1))
        daemon.write_config(sources)
        daemon.start()
        wait_until(lambda: all(len(daemon.times(f"s{i}")) >= 6 for i in range(4)), what="four sources collecting")
        status = daemon.status()
    finally:
        daemon.stop()
        hole.close()
    by_name = {s.name: s for s in status.sources}
    assert by_name["hole"].status == "down" and "timed out" in (by_name["hole"].last_error or "")
    for i in range(4):
        assert by_name[f"s{i}"].lateness_max < 1.0


def test_sigterm_stops_within_the_grace_and_loses_nothing_collected(pg15, fresh_db, daemon: Daemon) -> None:
    daemon.write_config([(f"s{i}", pg15.dsn(dbname=fresh_db), 1) for i in range(3)])
    daemon.start()
    wait_until(lambda: len(daemon.lines()) >= 9, what="collection")
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    final = daemon.status()
    collected = sum(s.measurements for s in final.sources)
    assert collected == len(daemon.lines())
    assert all(k.dropped == 0 and k.queued == 0 for k in final.sinks)


def reaper_backends(pg15, prefix: str) -> dict[str, int]:
    rows = pg15.psql("select datname, count(*) from pg_stat_activity where application_name like 'reaper%' "
                     f"and datname like '{prefix}%' group by datname order by datname")
    return {name: int(n) for name, n in (line.split("|") for line in rows.splitlines() if line.strip())}


def test_thirty_reloads_racing_discovery_leave_one_backend_per_database(pg15, fresh_db, daemon: Daemon) -> None:
    prefix = f"t_race_{uuid.uuid4().hex[:6]}_"
    databases = {f"{prefix}{i}" for i in range(10)}
    for name in sorted(databases):
        pg15.psql(f"create database {quote_ident(name)}")
    discovery = (f'\n[[sources]]\nname = "inst"\ndsn = "{pg15.dsn()}"\nkind = "postgres-discovery"\n'
                 f'include_pattern = "^{prefix}"\nmetrics = {{ ping = 1 }}\ndiscovery_interval_seconds = 1\n'
                 f'connect_timeout_seconds = 2\n')
    anchor = [("anchor", pg15.dsn(dbname=fresh_db), 1)]
    created = 10
    try:
        daemon.write_config(anchor, extra=discovery)
        daemon.start()
        wait_until(lambda: set(reaper_backends(pg15, prefix)) == databases, limit=60, what="every database collected")
        for i in range(30):
            daemon.write_config(anchor, extra=discovery if i % 2 else "")  # removed, re-added, removed...
            daemon.signal(signal.SIGHUP)
            if i % 3 == 0:  # meanwhile the server gains one database and loses another
                new = f"{prefix}{created}"
                created += 1
                pg15.psql(f"create database {quote_ident(new)}")
                gone = sorted(databases)[i % len(databases)]
                pg15.psql(f"drop database {quote_ident(gone)} with (force)")
                databases = (databases - {gone}) | {new}
            wait_until(lambda n=i + 1: (st := daemon.status()) is not None and st.reloads == n, limit=30,
                       what=f"reload {i + 1} applied")
        # the last reload re-added the discovery source: exactly one backend per database it finds
        expected = dict.fromkeys(sorted(databases), 1)
        wait_until(lambda: reaper_backends(pg15, prefix) == expected, limit=60,
                   what=f"one reaper backend per database (now {reaper_backends(pg15, prefix)})")
        daemon.write_config(anchor)
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: reaper_backends(pg15, prefix) == {}, limit=30, what="no backend once removed")
        assert daemon.status().reload_failures == 0
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log_text()
    finally:
        for i in range(created):
            pg15.psql(f"drop database if exists {quote_ident(prefix + str(i))} with (force)")


def test_a_second_daemon_on_the_same_state_dir_refuses_naming_the_first(pg15, fresh_db, daemon: Daemon) -> None:
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)])
    daemon.start()
    assert daemon.proc is not None
    second = subprocess.run([*REAPER, "run", "--config", str(daemon.config), "--pidfile",
                             str(daemon.tmp / "second.pid")], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    refusals = [line for line in second.stderr.splitlines() if "in use by another reaper daemon" in line]
    assert len(refusals) == 1 and f"(pid {daemon.proc.pid})" in refusals[0], second.stderr
    assert "STATE_DIRECTORY" in refusals[0]  # what works for a second process on the same config file
    assert "Traceback" not in second.stderr
    assert daemon.pidfile.read_text().strip() == str(daemon.proc.pid)  # the first one's pidfile is untouched
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_a_state_dir_under_a_regular_file_is_one_line_naming_that_file(tmp_path: Path) -> None:
    """mkdir's own words were "cannot create reaper.lock: File exists", naming neither folder nor file."""
    (tmp_path / "file").write_text("")
    config = tmp_path / "c.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "file" / "state"}"\n'
                      f'[[sources]]\nname = "a"\ndsn = "postgresql://127.0.0.1:1/x"\nmetrics = {{ db_stats = 60 }}\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n')
    done = subprocess.run([*REAPER, "run", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (f"state_dir {tmp_path / 'file' / 'state'}: cannot create the folder "
                                            f"{tmp_path / 'file'}: exists and is not a folder"), done.stderr


def test_relative_paths_are_the_config_files_folders_wherever_the_daemon_starts(tmp_path: Path) -> None:
    """systemd starts the daemon in /: the README's `path = "out/measurements.ndjson"` wrote /out/... (or
    failed for a user that cannot write /). Relative paths are taken from the config file's folder."""
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "reaper.toml"
    config.write_text('[collector]\nstate_dir = "state"\n'
                      '[[sources]]\nname = "a"\ndsn = "postgresql://127.0.0.1:1/x"\n'
                      'metrics = { db_stats = 60, instance_up = 1 }\nconnect_timeout_seconds = 1\n'
                      '[[sinks]]\ntype = "jsonfile"\npath = "out/measurements.ndjson"\n')
    out = folder / "out" / "measurements.ndjson"
    proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], cwd="/", stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:  # the unreachable source's instance_up = 0 is a measurement too
        wait_until(lambda: out.exists() and out.stat().st_size > 0, limit=30, what=f"{out}")
        assert (folder / "state" / "reaper.lock").exists()
        status = subprocess.run([*REAPER, "status", "--config", str(config), "--format", "plain"], cwd="/",
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_a_taken_http_listen_address_refuses_the_start_with_one_line(pg15, fresh_db, daemon: Daemon) -> None:
    """The health endpoints' address held by another program: `reaper run` exits 1 with one line naming the
    key and the reason (it used to end in a traceback of trio's exception groups)."""
    import socket

    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        daemon.config.write_text(daemon.config.read_text().replace("[collector]\n",
                                                                   f'[collector]\nhttp_listen = "{listen}"\n'))
        done = subprocess.run([*REAPER, "run", "--config", str(daemon.config)], capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 1, done.stderr
    problems = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert problems == [f"collector.http_listen: cannot listen on '{listen}': Address already in use"], done.stderr


def test_reload_and_status_find_the_daemon_after_its_configs_state_dir_was_edited(pg15, fresh_db,
                                                                                  daemon: Daemon) -> None:
    """An operator edits [collector] state_dir (it applies at the next start) and reloads: `reaper reload` and
    `reaper status` with the daemon's pidfile used to look only in the NEW folder and refuse ("no status
    file ... to confirm that process N is its daemon"); they now find the daemon's own (its lock file's)."""
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)])
    daemon.start()
    assert daemon.proc is not None
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace(f'state_dir = "{daemon.state}"', f'state_dir = "{daemon.tmp / "later"}"'))
    done = subprocess.run([*REAPER, "reload", "--pidfile", str(daemon.pidfile), "--config", str(daemon.config),
                           "--format", "plain"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("collector\tstate_dir\t") for line in done.stdout.splitlines()), done.stdout
    status = subprocess.run([*REAPER, "status", "--pidfile", str(daemon.pidfile), "--config", str(daemon.config),
                             "--format", "plain"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"daemon\t{daemon.proc.pid}\trunning\t"), status.stdout
    assert daemon.stop() == 0


def test_a_pause_file_named_by_a_reload_pauses_collection_until_it_is_removed(pg15, fresh_db, daemon: Daemon) -> None:
    """[collector] pause_file, added by a reload to a daemon started without one (which has no task watching
    for it until then): while the file exists the source is paused, after it is removed it collects again;
    a reload that drops the pause_file while the file exists lifts the pause (and its watch ends)."""
    def source_status() -> str:
        doc = daemon.status()
        return "" if doc is None else next(s.status for s in doc.sources if s.name == "a")

    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)])
    daemon.start()
    wait_until(lambda: len(daemon.times("a")) >= 2, what="collection")
    pause = daemon.tmp / "pause"
    pause.touch()
    daemon.config.write_text(daemon.config.read_text().replace(
        "shutdown_grace_seconds = 10\n", f'shutdown_grace_seconds = 10\npause_file = "{pause}"\n'))
    assert daemon.reload().returncode == 0
    wait_until(lambda: source_status() == "paused", what="the source paused by the pause file")
    seen = len(daemon.times("a"))
    pause.unlink()
    wait_until(lambda: len(daemon.times("a")) >= seen + 2, what="collection after the pause file went")
    pause.touch()
    wait_until(lambda: source_status() == "paused", what="paused again")
    daemon.config.write_text(daemon.config.read_text().replace(f'pause_file = "{pause}"\n', ""))
    assert daemon.reload().returncode == 0
    seen = len(daemon.times("a"))
    wait_until(lambda: len(daemon.times("a")) >= seen + 2, what="collection after the reload dropped the pause_file")
    assert daemon.stop() == 0


def test_a_pause_file_that_could_never_be_created_is_named_at_start_and_collection_goes_on(
        pg15, fresh_db, daemon: Daemon) -> None:
    """An operator's typo in [collector] pause_file (a folder that is a regular file) would leave the emergency
    pause silently unusable: the daemon says so at start, once, naming the path; it collects as configured."""
    not_a_folder = daemon.tmp / "notes.txt"
    not_a_folder.write_text("a file, not a folder\n")
    pause = not_a_folder / "pause"
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)])
    daemon.config.write_text(daemon.config.read_text().replace(
        "shutdown_grace_seconds = 10\n", f'shutdown_grace_seconds = 10\npause_file = "{pause}"\n'))
    daemon.start()
    wait_until(lambda: len(daemon.times("a")) >= 2, what="collection")
    warned = [line for line in daemon.log_text().splitlines() if "WARNING" in line]
    assert len(warned) == 1, daemon.log_text()
    assert f"[collector] pause_file {pause}: {not_a_folder} is not a folder" in warned[0], warned
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_text()
