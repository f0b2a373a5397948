"""A discovery source's databases are sources like the configured ones, everywhere a user looks.

- The Prometheus sink serves their series: it purged them at every scrape (it kept the configured sources'
  series only), so a fleet found by discovery was absent from Prometheus while its rows reached the other
  sinks (and so were [[sources_from]]'s rows).
- `reaper once` collects from them: it collected the discovery dsn's own maintenance database, under the
  discovery source's name, which the daemon never collects; `--source` takes a found database's name, as
  `check --connect` shows it (and `check --connect --source` takes it too).

A real daemon or CLI, a real server, the real endpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from test_daemon import Daemon, wait_until

pytestmark = pytest.mark.pg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            return answer.read().decode()
    except OSError:
        return ""


def test_discovered_databases_have_their_series_until_they_are_gone(pg15, tmp_path: Path) -> None:
    stem = f"promdisc_{uuid.uuid4().hex[:8]}"
    names = [f"{stem}_a", f"{stem}_b"]
    for name in names:
        pg15.psql(f"create database {name}")
    port = free_port()
    d = Daemon(tmp_path)
    d.config.write_text(f'[collector]\nstate_dir = "{d.state}"\n'
                        f'[[sources]]\nname = "found"\nkind = "postgres-discovery"\ndsn = "{pg15.dsn()}"\n'
                        f'include_pattern = "^{stem}_"\ndiscovery_interval_seconds = 1\nmetrics = {{ db_stats = 1 }}\n'
                        f'[[sinks]]\ntype = "prometheus"\nlisten = "127.0.0.1:{port}"\n'
                        f'[[sinks]]\ntype = "jsonfile"\npath = "{d.out}"\n')
    try:
        d.start()
        series = [f'pgwatch_db_stats_xact_commit{{dbname="found_{n}"' for n in names]
        wait_until(lambda: all(s in scrape(port) for s in series), 30, "both databases' series")
        pg15.psql(f"drop database {names[1]} with (force)")
        wait_until(lambda: series[1] not in scrape(port), 30, "the dropped database's series to go")
        assert series[0] in scrape(port)
    finally:
        assert d.stop() == 0
        pg15.psql(f"drop database if exists {names[0]} with (force); drop database if exists {names[1]} with (force)")


def test_once_collects_the_databases_a_discovery_source_finds(pg15, tmp_path: Path) -> None:
    stem = f"oncedisc_{uuid.uuid4().hex[:8]}"
    names = [f"{stem}_a", f"{stem}_b"]
    for name in names:
        pg15.psql(f"create database {name}")
    config = tmp_path / "c.toml"
    config.write_text(f'[[sources]]\nname = "found"\nkind = "postgres-discovery"\ndsn = "{pg15.dsn()}"\n'
                      f'include_pattern = "^{stem}_"\nmetrics = {{ db_stats = 60 }}\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "o.ndjson"}"\n')

    def once(*more: str) -> dict[str, str]:
        done = subprocess.run([sys.executable, "-m", "reaper.cli", "once", "--config", str(config), "--format",
                               "json", *more], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return {r["source"]: r["rows"][0]["real_dbname"] for r in json.loads(done.stdout)}

    try:
        assert once() == {f"found_{n}": n for n in names}
        assert once("--source", f"found_{names[1]}") == {f"found_{names[1]}": names[1]}
        assert once("--source", "found") == {f"found_{n}": n for n in names}
        # and check --connect, where those names come from
        done = subprocess.run([sys.executable, "-m", "reaper.cli", "check", "--connect", "--config", str(config),
                               "--format", "json", "--source", f"found_{names[0]}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert [r["name"] for r in json.loads(done.stdout)["sources"]] == [f"found_{names[0]}"]
        done = subprocess.run([sys.executable, "-m", "reaper.cli", "check", "--connect", "--config", str(config),
                               "--source", "found_nothing"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert "--source found_nothing: no such source in the config, nor found by its discovery sources" in (
            done.stderr)
    finally:
        for name in names:
            pg15.psql(f"drop database if exists {name} with (force)")
