"""A discovery source whose databases need more connections than the server has room for is said ahead.

Tried: an instance with more databases than free connection slots (a test server with max_connections =
15), discovered by a `reaper run`: the children past the limit failed one by one with the server's "too many
clients already", and while reaper held the last slots, every other client of that server was refused too.
Nothing said why, or that it would happen. Now the discovery's listing reads the server's room (one more
query on its short-lived connection) and the log says it once, with what to do."""

from __future__ import annotations

import logging
import subprocess
import uuid
from pathlib import Path

import pytest
import trio_asyncio
from pgserver import PgServer, ServerHandle, quote_ident
from test_daemon import PING, REAPER, wait_until

from reaper.config.schema import SourceConfig
from reaper.kinds import resolve

pytestmark = pytest.mark.pg
SLOTS = 15 - 3  # max_connections less superuser_reserved_connections (3, the default)


@pytest.mark.timeout(180)
def test_a_run_says_once_that_the_discovered_databases_need_more_connections_than_the_server_has(
        tmp_path: Path) -> None:
    with PgServer.create(major=15, settings={"max_connections": "15"}) as server:
        for i in range(SLOTS + 4):
            server.psql(f"create database {quote_ident(f'many_{i:02d}')}")
        config = tmp_path / "reaper.toml"
        config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                          f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n'
                          f'[metrics.ping]\ndescription = "ping"\ngauges = ["*"]\n[metrics.ping.sql]\n14 = "{PING}"\n'
                          f'[[sources]]\nname = "inst"\nkind = "postgres-discovery"\ndsn = "{server.dsn()}"\n'
                          f'include_pattern = "^many_"\nmetrics = {{ ping = 1 }}\ndiscovery_interval_seconds = 1\n')
        log = tmp_path / "reaper.log"
        with log.open("wb") as err:
            proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_until(lambda: "connections or more" in log.read_text(), limit=60, what="the warning")
            wait_until(lambda: log.read_text().count("source inst_many_") >= 3, limit=60, what="children at work")
            proc.terminate()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in log.read_text().splitlines() if "connections or more" in line]
    assert len(lines) == 1, lines  # not at every refresh (one a second here)
    assert " WARNING " in lines[0] and "source inst: 16 databases to collect take 16 connections or more" in lines[0]
    assert "the server has " in lines[0] and f"of its {SLOTS} connection slots free" in lines[0], lines[0]
    assert "narrow include_pattern or raise the limit" in lines[0]


async def test_a_roles_connection_limit_is_said_and_a_pattern_within_room_says_nothing(
        pg15: ServerHandle, caplog: pytest.LogCaptureFixture) -> None:
    stem = f"room_{uuid.uuid4().hex[:6]}_"
    role, password = f"roomy_{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    pg15.psql(f"create role {role} login password '{password}' connection limit 3")
    names = [f"{stem}{i}" for i in range(5)]
    try:
        for name in names:
            pg15.psql(f"create database {quote_ident(name)}")
        crowded = SourceConfig(name=f"{stem}all", dsn=pg15.dsn(user=role, password=password),
                               kind="postgres-discovery", include_pattern=f"^{stem}")
        roomy = SourceConfig(name=f"{stem}two", dsn=pg15.dsn(user=role, password=password),
                             kind="postgres-discovery", include_pattern=f"^{stem}[01]$")
        with caplog.at_level(logging.WARNING, logger="reaper.kinds"):
            async with trio_asyncio.open_loop():
                for _ in range(2):
                    assert len(await resolve(crowded)) == 5
                assert len(await resolve(roomy)) == 2
        said = [r.getMessage() for r in caplog.records if "connections or more" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith(f"source {stem}all: 5 databases"), said
        assert "the role's CONNECTION LIMIT is 3" in said[0] and "connection slots free" not in said[0], said
    finally:
        for name in names:
            pg15.psql(f"drop database if exists {quote_ident(name)} with (force)")
        pg15.psql(f"drop role {role}")
