"""OS metrics read in-process (no PL/Python helpers): only when reaper runs on the server's host.

"On the server's host" is decided as pgwatch does: the connection is a unix socket, or reaper can
read `<data_directory>/global/pg_control` and the system identifier in it is the server's
(`on_server_host`, re-checked every HOST_CHECK_SECONDS). Column names are pgwatch's.

psutil and /proc reads, statvfs of the data directory and its neighbours and the 8-byte read of
pg_control take microseconds: they run inline on the trio thread (issue 14: a worker-thread hop per
read cost more than the read, and trio's thread cache re-created the threads between bursts). A
network file system's stat could block longer, but a PostgreSQL data directory or tablespace on one
is rare enough not to pay a thread on every run for it. The CPU and vmstat rates come from the
previous run's counters kept in `ctx.state` (a first run waits one second between two samples with
`trio.sleep`). The server facts (data directory, log directory, tablespaces, unix socket or not) are
read once per connection (reaper.special.facts), not every run.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psutil
import trio

from reaper.errors import MetricError, MetricUnavailable
from reaper.special import Result, Rows, SpecialContext
from reaper.special.facts import server_facts

HOST_CHECK_SECONDS = 600.0
MIN_SAMPLE_SECONDS = 1.0  # rates over less than this are too noisy: sample again after this long
PG_CONTROL = os.path.join("global", "pg_control")

T = TypeVar("T")


# -- where reaper runs ---------------------------------------------------------------------------


def read_pg_control_sysid(data_directory: str) -> int | None:
    """The system identifier at the start of pg_control (a native-endian uint64); None if unreadable."""
    try:
        with open(os.path.join(data_directory, PG_CONTROL), "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    return int.from_bytes(head, sys.byteorder) if len(head) == 8 else None


async def server_paths(ctx: SpecialContext) -> dict[str, Any]:
    """data_directory, log_directory (absolute) and whether we came through a unix socket
    (read once per connection: reaper.special.facts)."""
    facts = await server_facts(ctx)
    return {"via_socket": facts.via_socket, "data_directory": facts.data_directory,
            "log_directory": facts.log_path}


async def on_server_host(ctx: SpecialContext) -> tuple[bool, str]:
    """(True, how) when reaper runs on the monitored server's host, else (False, why not).

    Cached in ctx.state for HOST_CHECK_SECONDS per server (system identifier + address).
    """
    server = ctx.server
    key = (server.system_identifier, server.address)
    now = trio.current_time()
    cached = ctx.state.get("_on_host")
    if cached is not None and cached[0] == key and now - cached[1] < HOST_CHECK_SECONDS:
        return cached[2]
    paths = await server_paths(ctx)
    verdict: tuple[bool, str]
    if paths["via_socket"]:
        verdict = (True, "unix socket")
    else:
        control = os.path.join(paths["data_directory"], PG_CONTROL)
        sysid = read_pg_control_sysid(paths["data_directory"])
        if sysid is None:
            verdict = (False, f"the connection is not a unix socket and {control} is not readable here")
        elif server.system_identifier is None or str(sysid) != str(server.system_identifier):
            verdict = (False, f"the connection is not a unix socket and {control} here belongs to another "
                              "server (its system identifier differs)")
        else:
            verdict = (True, f"{control} matches")
    ctx.state["_on_host"] = (key, now, verdict)
    return verdict


async def require_server_host(ctx: SpecialContext) -> None:
    local, why = await on_server_host(ctx)
    if not local:
        raise MetricUnavailable(ctx.metric.name, f"reaper is not on the server's host ({why}); this metric reads "
                                           "the host's own figures, so it is not collected")


# -- rates between two samples -------------------------------------------------------------------


async def _two_samples(ctx: SpecialContext, name: str, sample: Callable[[], T]) -> tuple[T, T, float]:
    """(previous, current, seconds between): the previous run's sample when it is at least
    MIN_SAMPLE_SECONDS old, else a fresh one taken MIN_SAMPLE_SECONDS before the current."""
    prev = ctx.state.get(name)
    now = time.monotonic()
    if prev is None or now - prev[0] < MIN_SAMPLE_SECONDS:
        first = sample()
        start = time.monotonic()
        await trio.sleep(MIN_SAMPLE_SECONDS)
        prev = (start, first)
    current = sample()
    taken = time.monotonic()
    ctx.state[name] = (taken, current)
    return prev[1], current, max(taken - prev[0], 1e-9)


def _cpu_split(a: Any, b: Any) -> dict[str, float]:
    """Percent of CPU time per category between two psutil.cpu_times() samples.

    On Linux guest time is already counted in user/nice, so it is left out of the total.
    """
    d = {f: max(0.0, getattr(b, f) - getattr(a, f)) for f in b._fields}
    total = sum(d.values()) - d.get("guest", 0.0) - d.get("guest_nice", 0.0)
    if total <= 0:
        total = 1.0

    def pct(*fields: str) -> float:
        return 100.0 * sum(d.get(f, 0.0) for f in fields) / total

    return {
        "user": pct("user", "nice"),
        "system": pct("system"),
        "idle": pct("idle"),
        "iowait": pct("iowait"),
        "irqs": pct("irq", "softirq", "interrupt", "dpc"),
        "other": pct("steal"),
        "busy": 100.0 - pct("idle", "iowait", "steal"),
    }


# -- the metrics -----------------------------------------------------------------------------------


async def cpu_load(ctx: SpecialContext) -> Result:
    await require_server_host(ctx)
    one, five, fifteen = os.getloadavg()
    return [("cpu_load", [{"epoch_ns": ctx.wall_ns, "load_1min": one, "load_5min": five, "load_15min": fifteen}])]


async def psutil_cpu(ctx: SpecialContext) -> Result:
    await require_server_host(ctx)
    before, after, _ = await _two_samples(ctx, "cpu_times", psutil.cpu_times)
    split = _cpu_split(before, after)
    one, five, _fifteen = os.getloadavg()
    cpus = psutil.cpu_count() or 1
    row = {
        "epoch_ns": ctx.wall_ns,
        "cpu_utilization": round(split["busy"], 2),
        "load_1m_norm": round(one / cpus, 2),
        "load_1m": round(one, 2),
        "load_5m_norm": round(five / cpus, 2),
        "load_5m": round(five, 2),
        **{k: round(split[k], 2) for k in ("user", "system", "idle", "iowait", "irqs", "other")},
    }
    return [("psutil_cpu", [row])]


def _memory() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    return {
        "total": int(vm.total),
        "used": int(vm.used),
        "free": int(vm.free),
        "buff_cache": int(getattr(vm, "buffers", 0) + getattr(vm, "cached", 0)),
        "available": int(vm.available),
        "percent": round(float(vm.percent), 2),
        "swap_total": int(sw.total),
        "swap_used": int(sw.used),
        "swap_free": int(sw.free),
        "swap_percent": round(float(sw.percent), 2),
    }


async def psutil_mem(ctx: SpecialContext) -> Result:
    await require_server_host(ctx)
    return [("psutil_mem", [{"epoch_ns": ctx.wall_ns, **_memory()}])]


def _disk_io() -> dict[str, int] | None:
    io = psutil.disk_io_counters(perdisk=False)
    if io is None:
        return None
    return {"read_count": int(io.read_count), "write_count": int(io.write_count),
            "read_bytes": int(io.read_bytes), "write_bytes": int(io.write_bytes)}


async def psutil_disk_io_total(ctx: SpecialContext) -> Result:
    await require_server_host(ctx)
    io = _disk_io()
    if io is None:
        raise MetricError(ctx.metric.name, "this host reports no disk I/O counters")
    return [("psutil_disk_io_total", [{"epoch_ns": ctx.wall_ns, **io}])]


def disk_rows(places: list[tuple[str, str]], wall_ns: int) -> Rows:
    """One row per distinct device among `places` [(tag_dir_or_tablespace, path)], in order; the first
    (the data directory) must exist, the others are skipped when absent or unreadable."""
    rows: Rows = []
    seen: set[int] = set()
    for i, (label, path) in enumerate(places):
        try:
            device = os.stat(path).st_dev
            usage = psutil.disk_usage(path) if device not in seen else None
        except OSError as e:
            if i == 0:
                raise MetricError("psutil_disk", f"{label} {path} is not visible here: {e.strerror or e}") from e
            continue
        seen.add(device)
        if usage is None:
            continue
        rows.append({"epoch_ns": wall_ns, "tag_dir_or_tablespace": label, "tag_path": path,
                     "total": int(usage.total), "used": int(usage.used), "free": int(usage.free),
                     "percent": round(float(usage.percent), 2)})
    return rows


async def psutil_disk(ctx: SpecialContext) -> Result:
    await require_server_host(ctx)
    facts = await server_facts(ctx)  # the tablespaces too: once per connection (reaper.special.facts)
    data_directory = facts.data_directory
    places = [("data_directory", data_directory), ("log_directory", facts.log_path),
              ("pg_wal", os.path.join(data_directory, "pg_wal"))]
    places += list(facts.tablespaces)
    return [("psutil_disk", disk_rows(places, ctx.wall_ns))]


# -- vmstat (Linux: /proc) -------------------------------------------------------------------------


def _keyed(names: str) -> re.Pattern[str]:
    """The first number of the lines of a /proc file that start with one of `names` (then ':' or blanks)."""
    return re.compile(rf"^({names}):?[ \t]+(\d+)", re.MULTILINE)


# only the lines vmstat_row reads, found at C speed: splitting every line (/proc/stat's intr line holds
# hundreds of numbers, /proc/vmstat ~170 lines) took ~100 us per sample
_STAT = _keyed("procs_running|procs_blocked|intr|ctxt")
_VMSTAT = _keyed("pswpin|pswpout|pgpgin|pgpgout")
_MEMINFO = _keyed("MemTotal|MemFree|Buffers|Cached|SwapTotal|SwapFree|SReclaimable")


def _read_keyed(path: str, pattern: re.Pattern[str]) -> dict[str, int]:
    with open(path, encoding="ascii", errors="replace") as f:
        return {key: int(value) for key, value in pattern.findall(f.read())}


def vmstat_sample() -> dict[str, Any]:
    """The counters and levels vmstat shows, read from /proc (Linux only)."""
    stat = _read_keyed("/proc/stat", _STAT)
    vm = _read_keyed("/proc/vmstat", _VMSTAT)
    mem = {k: v * 1024 for k, v in _read_keyed("/proc/meminfo", _MEMINFO).items()}
    cpu = psutil.cpu_times()
    return {
        "cpu": cpu,
        "r": stat.get("procs_running", 0),
        "b": stat.get("procs_blocked", 0),
        "intr": stat.get("intr", 0),
        "ctxt": stat.get("ctxt", 0),
        "pswpin": vm.get("pswpin", 0),
        "pswpout": vm.get("pswpout", 0),
        "pgpgin": vm.get("pgpgin", 0),  # KiB
        "pgpgout": vm.get("pgpgout", 0),
        "mem": mem,
    }


def vmstat_row(a: Mapping[str, Any], b: Mapping[str, Any], seconds: float, wall_ns: int) -> dict[str, Any]:
    """pgwatch's vmstat columns from two samples: memory in bytes, swap and block I/O in bytes per
    second, interrupts and context switches per second, CPU time split in whole percent."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rate(key: str, unit: int = 1) -> int:
        return round(max(0, b[key] - a[key]) * unit / seconds)

    split = _cpu_split(a["cpu"], b["cpu"])
    mem = b["mem"]
    one, five, fifteen = os.getloadavg()
    return {
        "epoch_ns": wall_ns,
        "r": b["r"],
        "b": b["b"],
        "swpd": mem.get("SwapTotal", 0) - mem.get("SwapFree", 0),
        "free": mem.get("MemFree", 0),
        "buff": mem.get("Buffers", 0),
        "cache": mem.get("Cached", 0) + mem.get("SReclaimable", 0),
        "si": rate("pswpin", page),
        "so": rate("pswpout", page),
        "bi": rate("pgpgin", 1024),
        "bo": rate("pgpgout", 1024),
        "in": rate("intr"),
        "cs": rate("ctxt"),
        "us": round(split["user"]),
        "sy": round(split["system"] + split["irqs"]),
        "id": round(split["idle"]),
        "wa": round(split["iowait"]),
        "st": round(split["other"]),
        "cpu_count": os.cpu_count() or 1,
        "load_1m": round(one, 2),
        "load_5m": round(five, 2),
        "load_15m": round(fifteen, 2),
        "total_memory": mem.get("MemTotal", 0),
    }


async def vmstat(ctx: SpecialContext) -> Result:
    await require_server_host(ctx)
    if not sys.platform.startswith("linux"):
        raise MetricError(ctx.metric.name, "needs Linux (it reads /proc/stat, /proc/vmstat and /proc/meminfo)")
    before, after, seconds = await _two_samples(ctx, "vmstat", vmstat_sample)
    return [("vmstat", [vmstat_row(before, after, seconds, ctx.wall_ns)])]

