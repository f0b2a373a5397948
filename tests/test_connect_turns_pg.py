"""Hosts that never answer a connect do not hold back a healthy source's connect (a real `reaper run`).

A data centre cut off behind a firewall that drops packets, or a server that accepts and never answers:
every source there hangs in its connect for its whole connect timeout. The fleet's connect limiter (32
at once, so that a fleet's start does not storm its servers) was held by them all that time, and a healthy
source added by a reload (or reconnecting after a failover) waited behind them without a word."""

from __future__ import annotations

from pathlib import Path

import pytest
from silent_server import SilentServer
from test_daemon import PING, Daemon, wait_until

from reaper.daemon.sourcestate import MAX_PARALLEL_CONNECTS

pytestmark = pytest.mark.pg
SILENT_SOURCES = MAX_PARALLEL_CONNECTS + 8
CONNECT_TIMEOUT = 60  # far longer than the test: no silent source's connect ends while it runs


def config(daemon: Daemon, silent_port: int, healthy_dsn: str | None) -> None:
    text = [f'[collector]\nstate_dir = "{daemon.state}"\nshutdown_grace_seconds = 10\n',
            f'[[sinks]]\ntype = "jsonfile"\npath = "{daemon.out}"\n',
            f'[metrics.ping]\ndescription = "ping"\ngauges = ["*"]\n[metrics.ping.sql]\n14 = "{PING}"\n']
    for i in range(SILENT_SOURCES):
        text.append(f'[[sources]]\nname = "silent_{i}"\ndsn = "postgresql://reaper@127.0.0.1:{silent_port}/db"\n'
                    f'metrics = {{ ping = 1 }}\nconnect_timeout_seconds = {CONNECT_TIMEOUT}\n')
    if healthy_dsn is not None:
        text.append(f'[[sources]]\nname = "healthy"\ndsn = "{healthy_dsn}"\nmetrics = {{ ping = 1 }}\n')
    daemon.config.write_text("\n".join(text))


@pytest.mark.timeout(120)
def test_a_healthy_source_connects_while_every_connect_turn_is_taken_by_hosts_that_never_answer(
        pg15, fresh_db, silent: SilentServer, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    config(daemon, silent.port, None)
    try:
        daemon.start()
        wait_until(lambda: len(silent.held) >= MAX_PARALLEL_CONNECTS, limit=30,
                   what=f"{MAX_PARALLEL_CONNECTS} connects hanging on the silent server")
        config(daemon, silent.port, pg15.dsn(dbname=fresh_db))
        assert daemon.reload().returncode == 0
        # before: its connect waited for a turn until the silent ones' timeouts (60 s)
        wait_until(lambda: daemon.times("healthy"), limit=30, what="the healthy source's first row")
        assert "timed out" not in daemon.log_text()
        assert len(silent.held) == SILENT_SOURCES  # the silent ones go on trying, each once
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert "Traceback" not in daemon.log_text()
