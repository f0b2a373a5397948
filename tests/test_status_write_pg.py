"""The status file of a real `reaper run` on PostgreSQL 15 (issue 14): with nothing changing it is not
rewritten tick after tick; a source going down rewrites it without being asked; SIGUSR2 and `reaper
status` get a fresh one whose counters include the latest ticks; with the daemon gone, `reaper status`
prints the file as it is. Writes are counted by the file's inode and mtime (each write replaces it)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import freshstatus
import pytest
from pgserver import quote_ident
from test_daemon import REAPER, Daemon, wait_until

from reaper.daemon.status import STATUS_FILE

pytestmark = pytest.mark.pg


def written(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@pytest.mark.timeout(120)
def test_the_status_file_is_written_on_change_and_on_request_not_per_tick(pg15, fresh_db, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.write_config([("main", pg15.dsn(dbname=fresh_db), 1)])
    path = daemon.state / STATUS_FILE
    try:
        daemon.start()
        assert daemon.proc is not None
        # settled (read, not asked for): the source up and its role known since its first tick
        wait_until(lambda: (st := freshstatus.read(daemon.state)) is not None and len(st.sources) == 1
                   and st.sources[0].status == "up" and st.sources[0].in_recovery is not None, limit=30,
                   what="the source up in the status file")
        before = written(path)
        ticks_before = len(daemon.times("main"))
        wait_until(lambda: len(daemon.times("main")) >= ticks_before + 6, limit=30, what="six more ticks")
        assert written(path) == before, "rewritten while nothing an operator acts on changed"

        # asked (SIGUSR2): a fresh file, its counters at least the ticks delivered so far
        delivered = len(daemon.times("main"))
        fresh = freshstatus.fresh(daemon.proc.pid, daemon.state)
        assert written(path) != before
        assert fresh.sources[0].ticks >= delivered > ticks_before
        # `reaper status` asks too (the pid verified from the status file), and prints the new file
        delivered = len(daemon.times("main"))
        asked = time.time()
        out = subprocess.run([*REAPER, "status", "--state-dir", str(daemon.state), "--json"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["updated_wall"] > asked and doc["sources"][0]["ticks"] >= delivered

        # a source going down: its database dropped under it; rewritten without being asked
        after_ask = written(path)
        pg15.psql(f"DROP DATABASE {quote_ident(fresh_db)} WITH (FORCE)")
        wait_until(lambda: (st := freshstatus.read(daemon.state)) is not None and st.sources[0].status == "down"
                   and st.sources[0].last_error is not None, limit=15, what="the source down in the status file")
        assert written(path) != after_ask
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    # no daemon to ask: the file as it is (written at shutdown), at once
    out = subprocess.run([*REAPER, "status", "--state-dir", str(daemon.state), "--format", "plain"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "\tnot running\t" in out.stdout.splitlines()[0]
    # every tick of the run in the fleet-wide lateness line: as many as the source's own count
    lines = {line.split("\t")[0]: line.split("\t") for line in out.stdout.splitlines()}
    ticks = int(lines["source"][5])
    assert ticks > 6 and int(lines["lateness"][1]) == ticks
    assert float(lines["lateness"][3]) >= float(lines["lateness"][2]) > 0
