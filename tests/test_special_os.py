"""OS metrics collected in-process on the server's host, and `reaper metrics print-init`."""

from __future__ import annotations

import os
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.cli import main
from reaper.config.schema import SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.errors import MetricError
from reaper.measurement import Measurement
from reaper.special import SpecialContext, special_spec
from reaper.special import osmetrics as om

OS_METRICS = ("cpu_load", "psutil_cpu", "psutil_mem", "psutil_disk", "psutil_disk_io_total", "vmstat")
CATALOG = Catalog.for_config()


@asynccontextmanager
async def os_runner(dsn: str, *, server_override: dict[str, Any] | None = None,
                    ) -> AsyncIterator[Callable[[str], Any]]:
    states: dict[str, dict[str, Any]] = {}
    async with db.open_loop():
        conn = await db.open_source_connection(dsn, statement_timeout_seconds=30)
        server = attrs.evolve(conn.server, **(server_override or {}))
        try:
            async def run(name: str) -> list[dict[str, Any]]:
                spec = special_spec(name)
                assert spec is not None and spec.local_only
                ctx = SpecialContext(source=SourceConfig(name="os", dsn=dsn), server=server, conn=conn,
                                     metric=CATALOG.metrics[name], wall_ns=time.time_ns(),
                                     state=states.setdefault(name, {}))
                ((table, rows),) = await spec.handler(ctx)
                assert table == name
                return rows

            yield run
        finally:
            await conn.close()


def assert_columns(name: str, rows: list[dict[str, Any]]) -> None:
    declared = list(CATALOG.metrics[name].columns)
    assert rows, name
    for row in rows:
        assert list(row) == declared, name
        assert isinstance(row["epoch_ns"], int)
        for column, value in row.items():
            if not column.startswith("tag_"):
                assert isinstance(value, int | float) and value >= 0, (name, column, value)


def percent(value: float) -> bool:
    return 0 <= value <= 100


@pytest.mark.pg
async def test_os_metrics_return_their_declared_columns_with_sane_values(pg15, fresh_db, monitor_role) -> None:
    role, password = monitor_role
    async with os_runner(pg15.dsn(user=role, dbname=fresh_db, password=password)) as run:
        for name in OS_METRICS:
            assert_columns(name, await run(name))

        (cpu,) = await run("psutil_cpu")  # the second run measures since the first
        parts = [cpu[k] for k in ("user", "system", "idle", "iowait", "irqs", "other")]
        assert all(map(percent, [*parts, cpu["cpu_utilization"]]))
        assert abs(sum(parts) - 100) < 0.5
        assert cpu["load_1m_norm"] <= cpu["load_1m"]

        (mem,) = await run("psutil_mem")
        assert 0 < mem["available"] <= mem["total"] and mem["used"] <= mem["total"] and mem["free"] <= mem["total"]
        assert percent(mem["percent"]) and percent(mem["swap_percent"]) and mem["swap_used"] <= mem["swap_total"]

        disks = await run("psutil_disk")
        datadir = pg15.psql("show data_directory")
        assert disks[0]["tag_dir_or_tablespace"] == "data_directory" and disks[0]["tag_path"] == datadir
        for d in disks:
            assert d["total"] > 0 and d["used"] <= d["total"] and d["free"] <= d["total"] and percent(d["percent"])
        assert len({d["tag_path"] for d in disks}) == len(disks)

        io_before = (await run("psutil_disk_io_total"))[0]
        io_after = (await run("psutil_disk_io_total"))[0]
        assert all(io_after[k] >= io_before[k] for k in ("read_count", "write_count", "read_bytes", "write_bytes"))

        (vm,) = await run("vmstat")
        assert vm["cpu_count"] == os.cpu_count()
        assert 0 < vm["free"] <= vm["total_memory"] and vm["cache"] <= vm["total_memory"]
        assert all(percent(vm[k]) for k in ("us", "sy", "id", "wa", "st"))
        assert 95 <= vm["us"] + vm["sy"] + vm["id"] + vm["wa"] + vm["st"] <= 105
        assert vm["cs"] > 0 and vm["in"] > 0  # a running machine switches contexts and takes interrupts


@pytest.mark.pg
async def test_a_server_that_is_not_ours_is_refused(pg15, fresh_db, monitor_role) -> None:
    role, password = monitor_role
    dsn = pg15.dsn(user=role, dbname=fresh_db, password=password)
    async with os_runner(dsn, server_override={"system_identifier": "42"}) as run:
        with pytest.raises(MetricError) as err:
            await run("psutil_mem")
    assert "not on the server's host" in err.value.message and "belongs to another server" in err.value.message


def test_disk_rows_keep_one_row_per_device(tmp_path) -> None:
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    places = [("data_directory", str(tmp_path)), ("log_directory", str(tmp_path / "missing")),
              ("pg_wal", str(tmp_path)), ("ts_fast", shm), ("ts_again", shm)]
    rows = om.disk_rows(places, 1)
    assert [(r["tag_dir_or_tablespace"], r["tag_path"]) for r in rows] == [("data_directory", str(tmp_path)),
                                                                           ("ts_fast", shm)]
    with pytest.raises(MetricError):
        om.disk_rows([("data_directory", str(tmp_path / "missing"))], 1)


def test_cpu_split_adds_up_and_leaves_guest_time_out() -> None:
    Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")  # psutil's, Linux
    a = Times(*([0.0] * 10))
    b = Times(30.0, 10.0, 10.0, 40.0, 5.0, 2.0, 1.0, 2.0, 8.0, 0.0)
    split = om._cpu_split(a, b)
    assert split["user"] == 40.0 and split["idle"] == 40.0 and split["irqs"] == 3.0 and split["other"] == 2.0
    assert split["busy"] == 53.0


@pytest.mark.pg
async def test_the_source_collects_every_os_metric_in_process(pg15, fresh_db, monitor_role) -> None:
    role, password = monitor_role
    config = SourceConfig(name="host", dsn=pg15.dsn(user=role, dbname=fresh_db, password=password),
                          metrics=dict.fromkeys(OS_METRICS, 2))
    got: list[Measurement] = []
    reaper = SourceReaper(config, CATALOG, got.append)
    async with db.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        with trio.fail_after(30):
            while {m.table for m in got} != set(OS_METRICS):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert not reaper.state.degraded
    for m in got:
        assert m.metric == m.table
        assert all(row["real_dbname"] == fresh_db for row in m.rows)


def test_print_init_lists_extensions_once_then_helpers(capsys) -> None:
    assert main(["metrics", "print-init", "full", "recommendations", "stat_statements"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("-- reaper metrics print-init full recommendations stat_statements")
    creates = [line for line in out if line.startswith("create extension")]
    assert "create extension if not exists pg_stat_statements;" in creates
    assert len(creates) == len(set(creates))
    assert main(["metrics", "print-init", "basic"]) == 0
    assert "nothing to create" in capsys.readouterr().out
    assert main(["metrics", "print-init", "no_such_thing"]) == 1
    assert "unknown metric or preset 'no_such_thing'" in capsys.readouterr().err
