"""`reaper status` and `reaper reload`: talking to a running daemon through its pid and status files."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from reaper.config.load import load_config
from reaper.config.schema import default_state_dir
from reaper.daemon.status import STATUS_FILE, DaemonStatus, read_status_file

STALE_AFTER_SECONDS = 20.0


def state_dir_from(args: argparse.Namespace) -> Path:
    if getattr(args, "state_dir", None):
        return Path(args.state_dir)
    if getattr(args, "config", None):
        config = load_config(args.config, require_sinks=False)
        if config.collector.state_dir:
            return Path(config.collector.state_dir)
    return Path(default_state_dir())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> DaemonStatus | None:
    try:
        return read_status_file(path)
    except (OSError, ValueError, orjson.JSONDecodeError):
        return None


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def show_status(args: argparse.Namespace) -> int:
    path = state_dir_from(args) / STATUS_FILE
    status = _read(path)
    if status is None:
        print(f"{path}: no status file: is reaper running with this state_dir? "
              "(use --config or --state-dir)", file=sys.stderr)
        return 1
    if args.json:
        print(path.read_text())
        return 0
    now = time.time()
    age = now - status.updated_wall
    alive = pid_alive(status.pid)
    console = Console()
    state = "running" if alive and age < STALE_AFTER_SECONDS else ("not running" if not alive else "not responding")
    console.print(f"reaper {status.version} pid {status.pid}: [bold]{state}[/bold], up "
                  f"{(status.updated_wall - status.started_wall) / 60:.0f} min, config {status.config_path}, "
                  f"{status.reloads} reloads ({status.reload_failures} rejected), "
                  f"{status.tasks - status.io_tasks} tasks (+{status.io_tasks} socket watchers); "
                  f"status written {age:.0f}s ago")
    sources = Table(title=f"{len(status.sources)} sources", title_justify="left")
    for col in ("source", "status", "last tick", "next tick", "ticks", "rows", "errors", "degraded", "lateness p99",
                "last error"):
        sources.add_column(col, overflow="fold")
    for s in status.sources:
        sources.add_row(
            s.name, s.status, _ago(now - s.last_tick_wall if s.last_tick_wall else None),
            "-" if s.next_tick_in is None else f"in {s.next_tick_in:.0f}s", str(s.ticks), str(s.rows),
            str(s.metric_errors), ", ".join(s.degraded) or "-", f"{s.lateness_p99 * 1000:.0f} ms",
            s.last_error or "-")
    console.print(sources)
    sinks = Table(title=f"{len(status.sinks)} sinks", title_justify="left")
    for col in ("sink", "queued", "sent", "spilled", "on disk", "dropped"):
        sinks.add_column(col)
    for k in status.sinks:
        sinks.add_row(k.label, str(k.queued), str(k.sent), str(k.spilled), f"{k.spill_bytes:,} B", str(k.dropped))
    console.print(sinks)
    return 0 if state == "running" else 1


def reload_daemon(args: argparse.Namespace) -> int:
    try:
        pid = int(Path(args.pidfile).read_text().strip())
    except (OSError, ValueError) as e:
        print(f"{args.pidfile}: cannot read a pid: {e}", file=sys.stderr)
        return 1
    if not pid_alive(pid):
        print(f"{args.pidfile}: process {pid} is not running", file=sys.stderr)
        return 1
    path = state_dir_from(args) / STATUS_FILE
    before = _read(path)
    if before is None or before.pid != pid:
        print(f"{path}: no status file of process {pid}: cannot tell whether the reload applies; "
              "sending SIGHUP anyway", file=sys.stderr)
    os.kill(pid, signal.SIGHUP)
    if before is None or before.pid != pid:
        return 1
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        now = _read(path)
        if now is not None and now.reloads > before.reloads:
            print(f"reload applied (pid {pid}): {len(now.sources)} sources, {len(now.sinks)} sinks")
            return 0
        if now is not None and now.reload_failures > before.reload_failures:
            print(f"reload rejected (pid {pid}): the config is invalid; the daemon keeps running its old config. "
                  f"Run `reaper check --config {now.config_path}` to see every problem.", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"no answer from pid {pid} within {args.wait:g}s", file=sys.stderr)
    return 1
