"""`reaper check --connect` on the postgres sinks: it says whether the sink's role can write the storage, with
the fix, and the collector agrees (real PostgreSQL 15, a real `reaper run`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pgserver import quote_ident

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]


def check(config: Path) -> tuple[int, dict]:
    done = subprocess.run([*REAPER, "check", "--config", str(config), "--connect", "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(done.stdout)


def stored_rows(pg15, db: str) -> int:
    exists = pg15.psql("select to_regclass('public.db_stats') is not null", dbname=db)
    return int(pg15.psql("select count(*) from public.db_stats", dbname=db)) if exists == "t" else 0


def run_briefly(config: Path, until, limit: float = 30) -> str:
    log = config.parent / "reaper.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + limit
        while not until() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return log.read_text()


def test_a_storage_role_without_create_is_named_with_its_grant_and_the_collector_agrees(pg15, fresh_db,
                                                                                       tmp_path: Path) -> None:
    role = "reaper_storage_writer"
    pg15.psql(f"drop role if exists {role}; create role {role} login")
    try:
        config = tmp_path / "reaper.toml"
        config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                          f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn()}"\nmetrics = {{ db_stats = 1 }}\n'
                          f'[[sinks]]\ntype = "postgres"\ndsn = "{pg15.dsn(user=role, dbname=fresh_db)}"\n'
                          'batching_delay_seconds = 0.2\n')
        code, report = check(config)
        [sink] = report["sinks"]
        assert code == 1 and sink["reachable"] and sink["problems"], report["sinks"]
        assert sink["fixes"] == [f"GRANT CREATE ON DATABASE {quote_ident(fresh_db)} TO {quote_ident(role)};",
                                 f"GRANT CREATE ON SCHEMA public TO {quote_ident(role)};"]
        # the collector agrees: it cannot write there
        log = run_briefly(config, lambda: "permission denied" in (tmp_path / "reaper.log").read_text())
        assert "permission denied" in log and stored_rows(pg15, fresh_db) == 0, log
        pg15.psql(sink["fixes"][0])
        pg15.psql(sink["fixes"][1], dbname=fresh_db)
        code, report = check(config)
        assert code == 0 and report["sinks"][0]["problems"] == [], report["sinks"]
        run_briefly(config, lambda: stored_rows(pg15, fresh_db) >= 2)
        assert stored_rows(pg15, fresh_db) >= 2
    finally:
        pg15.psql(f"drop owned by {role} cascade", dbname=fresh_db)
        pg15.psql(f"drop owned by {role} cascade; drop role if exists {role}")
