"""What a source says of metrics it cannot run on its server, through the real CLI (pgwatch #1125 asks for
clear reporting of those). A metric the config names itself and the server's version cannot run is a
warning; one that came with a preset made for every version (stat_lock needs PostgreSQL 19) is expected on
older servers: an INFO line, not a warning at every source's start. A missing extension is a warning either
way: it is the DBA's to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pg

REAPER = [sys.executable, "-m", "reaper.cli"]


def once_log(pg15, fresh_db: str, tmp_path: Path, keys: str) -> list[str]:
    config = tmp_path / "c.toml"
    config.write_text(f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n{keys}\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "o.ndjson"}"\n')
    done = subprocess.run([*REAPER, "once", "--config", str(config), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def said(lines: list[str], metric: str) -> list[str]:
    return [x.split()[1] for x in lines if f"metric {metric} " in x]


def test_a_presets_metric_for_newer_servers_is_said_not_warned(pg15, fresh_db: str, tmp_path: Path) -> None:
    assert pg15.major < 19
    lines = once_log(pg15, fresh_db, tmp_path, 'preset = "exhaustive"')
    assert said(lines, "stat_lock") == ["INFO"]
    assert said(lines, "stat_statements") == ["WARNING"]  # (not created in this database)


def test_a_metric_the_config_names_itself_is_warned(pg15, fresh_db: str, tmp_path: Path) -> None:
    lines = once_log(pg15, fresh_db, tmp_path, "metrics = { stat_lock = 30, db_stats = 30 }")
    assert said(lines, "stat_lock") == ["WARNING"]
