"""The Prometheus sink serves the series of every source that collects, not only those the config lists:
a discovery source's databases (and [[sources_from]]'s rows) are sources too. It purged their series at
every scrape (it kept the configured sources' series only), so a fleet found by discovery was absent from
Prometheus while its rows reached the other sinks. A real daemon, a real server, the real endpoint."""

from __future__ import annotations

import socket
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
