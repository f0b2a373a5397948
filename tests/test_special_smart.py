"""smart_health_per_disk with Debian's smartctl on this machine, and its per-device statuses.

The handler needs to know it runs on the server's host, so the tests connect to a local throwaway
server of their own (a unix-socket or pg_control check, as for the OS metrics).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from fakes import count_spawns
from pgserver import PgServer

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.errors import MetricUnavailable
from reaper.measurement import Measurement
from reaper.special import SpecialContext, smart, special_spec
from reaper.special.tools import ToolResult

CATALOG = Catalog.for_config()
COLUMNS = list(CATALOG.metrics["smart_health_per_disk"].columns)


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    with PgServer.create() as pg:
        yield pg


@asynccontextmanager
async def smart_runner(dsn: str) -> AsyncIterator[Callable[[], Any]]:
    config = SourceConfig(name="smart", dsn=dsn)
    state: dict[str, Any] = {}
    async with db.open_loop():
        conn = await db.open_source_connection(dsn, statement_timeout_seconds=30)
        try:
            async def run() -> list[dict[str, Any]]:
                spec = special_spec("smart_health_per_disk")
                assert spec is not None and spec.local_only
                ctx = SpecialContext(source=config, server=conn.server, conn=conn,
                                     metric=CATALOG.metrics["smart_health_per_disk"], wall_ns=time.time_ns(),
                                     state=state)
                ((table, rows),) = await spec.handler(ctx)
                assert table == "smart_health_per_disk"
                return rows

            yield run
        finally:
            await conn.close()


def smartctl_json(*args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(["smartctl", "--json", *args], capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, json.loads(proc.stdout)


def lsblk_disks() -> set[str]:
    out = subprocess.run(["lsblk", "--nodeps", "--noheadings", "--output", "NAME,TYPE"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return {name for name, kind in (line.split() for line in out.splitlines() if line.strip())
            if kind == "disk" and not name.startswith(smart.VIRTUAL_PREFIXES)}


@pytest.mark.pg
async def test_smartctl_gives_one_truthful_row_per_disk_of_this_machine(server: PgServer) -> None:
    async with smart_runner(server.dsn()) as run:
        rows = await run()
    _, scanned = smartctl_json("--scan-open")
    expected = lsblk_disks() | {smart.device_label(d["name"], d.get("type")) for d in scanned.get("devices", [])}
    assert sorted(row["tag_device"] for row in rows) == sorted(expected)
    for row in rows:
        assert list(row) == COLUMNS
        code, answer = smartctl_json("-H", "-i", f"/dev/{row['tag_device'].split(' ')[0]}")
        assert row["retcode"] == code, row
        passed = (answer.get("smart_status") or {}).get("passed")
        if passed is None:  # virtual disks (this machine's virtio disk): said so, with smartctl's reason
            reasons = [m["string"] for m in answer["smartctl"].get("messages", [])]
            assert row["health_passed"] is None and row["status"].split(": ", 1)[0] in ("unsupported", "not permitted")
            assert all(reason in row["status"] for reason in reasons), (row, reasons)
        else:
            assert row["health_passed"] == int(passed) and row["status"] == ("passed" if passed else "FAILED")


@pytest.mark.pg
async def test_every_tick_gives_rows_and_no_error_line(server: PgServer, caplog: pytest.LogCaptureFixture) -> None:
    config = SourceConfig(name="disks", dsn=server.dsn(), metrics={"smart_health_per_disk": 1})
    got: list[Measurement] = []
    reaper = SourceReaper(config, CATALOG, got.append)
    caplog.set_level(logging.INFO)
    async with db.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        with trio.fail_after(60):
            while len([m for m in got if m.table == "smart_health_per_disk"]) < 3:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert all(m.rows for m in got if m.table == "smart_health_per_disk")
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [line for line in noisy if "smart" in line], noisy
    assert "smart_health_per_disk" not in reaper.state.degraded


@pytest.mark.pg
async def test_a_missing_smartctl_names_its_package(server: PgServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    async with smart_runner(server.dsn()) as run:
        with pytest.raises(MetricUnavailable) as caught:
            await run()
    assert caught.value.message == "smartctl is not installed or not on reaper's PATH (Debian package smartmontools)"


@pytest.mark.pg
async def test_smartctl_that_may_open_no_disk_says_what_it_needs(server: PgServer, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-root reaper: every device answers "Permission denied" (a stand-in smartctl says so)."""
    standin = tmp_path / "smartctl"
    standin.write_text('#!/bin/sh\nfor a; do dev=$a; done\n'
                       'if [ "$1" = --scan-open ]; then echo \'{"devices": []}\'; exit 0; fi\n'
                       'echo "{\\"smartctl\\": {\\"messages\\": [{\\"string\\": \\"Smartctl open device: $dev failed: '
                       'Permission denied\\", \\"severity\\": \\"error\\"}], \\"exit_status\\": 2}}"\nexit 2\n')
    standin.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    if not smart.sysfs_disks():
        pytest.skip("this machine has no disk in /sys/block")
    async with smart_runner(server.dsn()) as run:
        with pytest.raises(MetricUnavailable) as caught:
            await run()
    assert "smartctl may open no disk (not permitted: Smartctl open device: /dev/" in caught.value.message
    assert caught.value.message.endswith(smart.ROOT_HINT)


def _result(code: int, data: dict[str, Any]) -> ToolResult:
    return ToolResult(code, json.dumps(data).encode(), "")


def test_device_rows_from_smartctl_answers() -> None:
    healthy = smart.device_row("sda", _result(0, {"model_name": "WDC WD40", "smart_status": {"passed": True}}), 5)
    assert healthy == {"epoch_ns": 5, "tag_device": "sda", "retcode": 0, "model": "WDC WD40", "health_passed": 1,
                       "status": "passed"}
    dying = smart.device_row("sdb", _result(8, {"model_name": "ST8000", "smart_status": {"passed": False}}), 5)
    assert (dying["retcode"], dying["health_passed"], dying["status"]) == (8, 0, "FAILED")
    virtual = smart.device_row("vda", _result(1, {"smartctl": {"messages": [
        {"string": "/dev/vda: Unable to detect device type", "severity": "error"}]}}), 5)
    assert virtual["health_passed"] is None
    assert virtual["status"] == "unsupported: /dev/vda: Unable to detect device type"
    garbled = smart.device_row("sdc", ToolResult(4, b"not json", "smartctl: something broke\n"), 5)
    assert garbled["status"] == "unsupported: smartctl: something broke"


def test_device_labels_and_sysfs_disks(tmp_path: Path) -> None:
    assert smart.device_label("/dev/sda", "sat") == "sda"
    assert smart.device_label("/dev/bus/0", "megaraid,3") == "bus/0 (megaraid,3)"
    for name in ("sda", "nvme0n1", "loop0", "zram0", "dm-1", "md127", "sr0", "vdb"):
        (tmp_path / name).mkdir()
    assert smart.sysfs_disks(str(tmp_path)) == ["nvme0n1", "sda", "vdb"]
    assert smart.sysfs_disks(str(tmp_path / "absent")) == []


@pytest.mark.pg
async def test_a_device_without_smart_is_not_asked_every_run(server: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: the scan and a device's "unsupported" answer are kept (tools.VERDICT_SECONDS); only
    devices with SMART are asked every run. The rows stay the same, with each run's time."""
    spawns = count_spawns(monkeypatch)
    async with smart_runner(server.dsn()) as run:
        first = await run()
        first_spawns = len(spawns)
        later = [await run(), await run()]
    with_smart = [row for row in first if row["health_passed"] is not None]
    assert first_spawns == 1 + len(first)  # the scan, then each device
    assert len(spawns) - first_spawns == 2 * len(with_smart)
    for rows in later:
        assert [{**row, "epoch_ns": 0} for row in rows if row["health_passed"] is None] == \
               [{**row, "epoch_ns": 0} for row in first if row["health_passed"] is None]
        assert all(row["epoch_ns"] > first[0]["epoch_ns"] for row in rows)
