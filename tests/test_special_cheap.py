"""Special metrics without per-run overhead (issue 14): their server facts are read once per connection,
the OS metrics never hop to a worker thread, and a tool found missing is not spawned again every run.

Real pieces: a PostgreSQL 15 server, this host's psutil and /proc, real subprocesses (a missing
pgbackrest behind `/usr/bin/env`); trio.to_thread.run_sync and trio.run_process are wrapped to count
their calls, never replaced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import SourceConfig, SpecialsConfig
from reaper.daemon.source import SourceReaper
from reaper.errors import MetricUnavailable
from reaper.measurement import Measurement
from reaper.special import SpecialContext, backup, special_spec, tools

OS_METRICS = ("cpu_load", "psutil_cpu", "psutil_mem", "psutil_disk", "psutil_disk_io_total", "vmstat")
CATALOG = Catalog.for_config()


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Any]:
    """Wrap owner.name (an async function) so that each call is recorded; returns the record."""
    calls: list[Any] = []
    real = getattr(owner, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.pg
async def test_os_metrics_read_the_server_once_per_connection_and_use_no_thread(
        pg15, fresh_db, monitor_role, monkeypatch: pytest.MonkeyPatch) -> None:
    role, password = monitor_role
    dsn = pg15.dsn(user=role, dbname=fresh_db, password=password)
    threads = count_calls(monkeypatch, trio.to_thread, "run_sync")
    states: dict[str, dict[str, Any]] = {}
    async with db.open_loop():
        for _connection in range(2):
            conn = await db.open_source_connection(dsn, statement_timeout_seconds=30)
            try:
                sent = []
                for _run in range(3):
                    before = conn.statements
                    for name in OS_METRICS:
                        spec = special_spec(name)
                        assert spec is not None
                        ctx = SpecialContext(source=SourceConfig(name="os", dsn=dsn), server=conn.server, conn=conn,
                                             metric=CATALOG.metrics[name], wall_ns=time.time_ns(),
                                             state=states.setdefault(name, {}))
                        ((table, rows),) = await spec.handler(ctx)
                        assert table == name and rows
                    sent.append(conn.statements - before)
            finally:
                await conn.close()
            # one statement for every OS metric's facts on a new connection, none after it
            assert sent == [1, 0, 0]
    assert threads == []


@pytest.mark.pg
async def test_the_local_lane_reads_the_facts_once_over_the_slow_lanes_connection(pg15, fresh_db,
                                                                                  monitor_role) -> None:
    role, password = monitor_role
    config = SourceConfig(name="host", dsn=pg15.dsn(user=role, dbname=fresh_db, password=password),
                          metrics=dict.fromkeys(OS_METRICS, 1))
    got: list[Measurement] = []
    reaper = SourceReaper(config, CATALOG, got.append)
    async with db.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        with trio.fail_after(30):
            while min(sum(m.table == name for m in got) for name in OS_METRICS) < 3:
                await trio.sleep(0.05)
        assert reaper.slow is not None
        statements = reaper.slow.state.statements_total
        nursery.cancel_scope.cancel()
    assert not reaper.state.degraded
    assert statements == 1  # every OS metric ran 3 times: one facts statement in all


async def test_a_missing_tool_is_spawned_once_per_verdict_period(tmp_path: Path, mock_clock: trio.testing.MockClock,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`/usr/bin/env pgbackrest` with pgbackrest nowhere on the PATH: a real spawn that finds no tool."""
    monkeypatch.setenv("PATH", str(tmp_path))
    spawns = count_calls(monkeypatch, trio, "run_process")
    config = SourceConfig(name="remote", dsn="postgresql://nowhere.invalid/db",
                          specials=SpecialsConfig(command_prefix="/usr/bin/env", pgbackrest_stanza="demo"))
    state: dict[str, Any] = {}

    async def run() -> str:
        ctx = SpecialContext(source=config, server=None, conn=None,  # type: ignore[arg-type]
                             metric=CATALOG.metrics["backup_age_pgbackrest"], wall_ns=time.time_ns(), state=state)
        with pytest.raises(MetricUnavailable) as caught:
            await backup.backup_age_pgbackrest(ctx)
        return caught.value.message

    said = {await run() for _ in range(5)}
    assert said == {"pgbackrest is not installed or not where the command prefix runs it (Debian package "
                    "pgbackrest)"}
    assert len(spawns) == 1
    mock_clock.jump(tools.VERDICT_SECONDS - 1)
    assert await run() in said and len(spawns) == 1
    mock_clock.jump(1)
    assert await run() in said and len(spawns) == 2  # the verdict is asked again after its period
    assert await run() in said and len(spawns) == 2


async def test_another_command_is_asked_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed configuration (here the stanza) is another command: the kept verdict does not apply."""
    monkeypatch.setenv("PATH", str(tmp_path))
    spawns = count_calls(monkeypatch, trio, "run_process")
    state: dict[str, Any] = {}
    for stanza in ("one", "one", "two", "two"):
        config = SourceConfig(name="remote", dsn="postgresql://nowhere.invalid/db",
                              specials=SpecialsConfig(command_prefix="/usr/bin/env", pgbackrest_stanza=stanza))
        ctx = SpecialContext(source=config, server=None, conn=None,  # type: ignore[arg-type]
                             metric=CATALOG.metrics["backup_age_pgbackrest"], wall_ns=time.time_ns(), state=state)
        with pytest.raises(MetricUnavailable):
            await backup.backup_age_pgbackrest(ctx)
    assert len(spawns) == 2
