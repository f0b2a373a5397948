"""SMART health of the database host's disks: `smart_health_per_disk`, with smartmontools' smartctl.

pgwatch reads it through a PL/Python helper inside the server; reaper runs smartctl itself, on the
server's host or through the source's `specials.command_prefix` (reaper.special.tools). The devices
are those `smartctl --scan-open --json` finds, plus (when smartctl runs here) every whole disk in
/sys/block it does not list (virtual disks such as virtio's are not in the scan: they get a row that
says SMART is unsupported, rather than no row). Each device is asked `smartctl --json -H -i`.

One row per device: `tag_device` (the name without /dev/), `retcode` (smartctl's exit status, as
pgwatch stores it: 0 = healthy, a bit mask otherwise), and reaper's own `model`, `health_passed`
(1 passed, 0 failed, null when SMART could not say) and `status` ("passed", "FAILED", "unsupported:
<smartctl's reason>", "not permitted: ..."). A device that cannot be asked is a row, not an error line
per tick. When smartctl may open no device at all (it needs root, or CAP_SYS_RAWIO and read access to
the devices) the metric is unavailable, said once.

How often smartctl runs: the device list (`--scan-open`) is kept for VERDICT_SECONDS, and so is a
device's "unsupported"/"not permitted" row (a virtual disk will not grow SMART; its row is written every
run, from the kept answer); a missing smartctl or one that may open no disk is a verdict kept as long
(reaper.special.tools.with_verdict). A device with SMART is asked every run. So on a virtual machine
smartctl runs once per VERDICT_SECONDS, not once per device per interval.
"""

from __future__ import annotations

import json
import os
from typing import Any

import trio

from reaper.errors import MetricError, MetricUnavailable
from reaper.special import Result, Rows, SpecialContext
from reaper.special.tools import VERDICT_SECONDS, ToolResult, ToolTimeout, check_where, denied, run_tool, with_verdict

PACKAGE = "smartmontools"
DEVICE_SECONDS = 15.0  # one device's smartctl call
PARALLEL = 4  # devices asked at once
SYS_BLOCK = "/sys/block"
# block devices that are never physical disks
VIRTUAL_PREFIXES = ("loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd", "zd", "rbd")
ROOT_HINT = ("smartctl needs root (or CAP_SYS_RAWIO and read access to the devices): run reaper so, or set the "
             "source's specials.command_prefix, e.g. \"sudo -n\"")


def sysfs_disks(root: str = SYS_BLOCK) -> list[str]:
    """Whole disks of this host by kernel name (sda, nvme0n1, vda), sorted; virtual devices left out."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(n for n in names if not n.startswith(VIRTUAL_PREFIXES))


def _json(result: ToolResult) -> dict[str, Any]:
    try:
        data = json.loads(result.stdout)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _messages(data: dict[str, Any]) -> list[str]:
    found = (data.get("smartctl") or {}).get("messages") or []
    return [str(m.get("string", "")).strip() for m in found if isinstance(m, dict) and m.get("string")]


def device_label(name: str, dev_type: str | None) -> str:
    """`sda`; a RAID member keeps its type, which tells it from the others behind the same node."""
    label = name.removeprefix("/dev/")
    return f"{label} ({dev_type})" if dev_type and "," in dev_type else label


def device_row(label: str, result: ToolResult, wall_ns: int) -> dict[str, Any]:
    """One device's row from `smartctl --json -H -i` (its JSON on stdout, its exit status)."""
    data = _json(result)
    model = data.get("model_name") or data.get("model_family") or (data.get("scsi_model_name")) or ""
    smart = data.get("smart_status")
    passed = smart.get("passed") if isinstance(smart, dict) else None
    messages = _messages(data) or [result.last_error_line()]
    if isinstance(passed, bool):
        health: int | None = int(passed)
        status = "passed" if passed else "FAILED"
    else:
        health = None
        reason = "; ".join(messages)
        status = f"not permitted: {reason}" if denied(reason) else f"unsupported: {reason}"
    return {"epoch_ns": wall_ns, "tag_device": label, "retcode": result.returncode, "model": str(model),
            "health_passed": health, "status": status}


async def scan(ctx: SpecialContext, prefix: list[str]) -> list[tuple[str, str | None]]:
    """[(device path, -d type or None)] that `smartctl --scan-open --json` lists (kept VERDICT_SECONDS)."""
    now = trio.current_time()
    kept = ctx.state.get("_scan")
    if kept is not None and kept[0] == prefix and now < kept[1]:
        return list(kept[2])
    try:
        result = await run_tool(ctx, ["smartctl", "--scan-open", "--json"], package=PACKAGE, prefix=prefix,
                                seconds=DEVICE_SECONDS)
    except ToolTimeout as e:
        raise MetricError(ctx.metric.name, str(e)) from None
    devices = _json(result).get("devices") or []
    found = [(str(d["name"]), d.get("type")) for d in devices if isinstance(d, dict) and d.get("name")]
    ctx.state["_scan"] = (prefix, now + VERDICT_SECONDS, found)
    return list(found)


def _settled(row: dict[str, Any]) -> bool:
    """A device's answer that the next runs would get again: no SMART here, or no access to it."""
    return row["health_passed"] is None and str(row["status"]).startswith(("unsupported", "not permitted"))


async def smart_health_per_disk(ctx: SpecialContext) -> Result:
    prefix = await check_where(ctx)
    return await with_verdict(ctx, ("smartctl", *prefix), lambda: _smart(ctx, prefix))


async def _smart(ctx: SpecialContext, prefix: list[str]) -> tuple[Result, bool]:
    devices = await scan(ctx, prefix)
    if not prefix:  # smartctl runs here: also the disks the scan cannot open or type
        listed = {name for name, _ in devices}
        devices += [(f"/dev/{n}", None) for n in sysfs_disks()
                    if f"/dev/{n}" not in listed]
    rows: Rows = []
    limiter = trio.CapacityLimiter(PARALLEL)
    now = trio.current_time()
    kept: dict[tuple[str, ...], tuple[float, dict[str, Any]]] = ctx.state.setdefault("_devices", {})
    for key in [k for k, (until, _) in kept.items() if now >= until]:
        del kept[key]

    async def ask(name: str, dev_type: str | None) -> None:
        argv = ["smartctl", "--json", "-H", "-i", *(["-d", dev_type] if dev_type else []), name]
        label = device_label(name, dev_type)
        key = (*prefix, *argv)
        if key in kept:  # no SMART on it (or no access): said by its last answer
            rows.append({**kept[key][1], "epoch_ns": ctx.wall_ns})
            return
        async with limiter:
            try:
                result = await run_tool(ctx, argv, package=PACKAGE, prefix=prefix, seconds=DEVICE_SECONDS)
            except ToolTimeout as e:
                rows.append({"epoch_ns": ctx.wall_ns, "tag_device": label, "retcode": None, "model": "",
                             "health_passed": None, "status": f"no answer: {e}"})
                return
        row = device_row(label, result, ctx.wall_ns)
        if _settled(row):
            kept[key] = (now + VERDICT_SECONDS, row)
        rows.append(row)

    async with trio.open_nursery() as nursery:
        for name, dev_type in devices:
            nursery.start_soon(ask, name, dev_type)
    if not rows:
        raise MetricUnavailable(ctx.metric.name, "smartctl finds no disk here (smartctl --scan-open lists none"
                                                 + ("" if prefix else f" and {SYS_BLOCK} has no physical disk") + ")")
    if all(row["status"].startswith("not permitted") for row in rows):
        raise MetricUnavailable(ctx.metric.name, f"smartctl may open no disk ({rows[0]['status']}); {ROOT_HINT}")
    rows.sort(key=lambda row: row["tag_device"])
    return [(ctx.metric.table, rows)], False
