"""`reaper status` and `reaper reload`: talking to a running daemon through its pid and status files.

The daemon rewrites its status file when something an operator acts on changed, and its counters at
least every STATUS_HEARTBEAT_SECONDS; `reaper status` first asks it for a fresh one (SIGUSR2, to a pid
verified as below) and waits up to REFRESH_WAIT_SECONDS for it.

Neither needs the sources' secrets: the state dir is read from the config's `[collector]` table alone
(no environment expansion of DSNs, no validation of sources). `reload` signals a pid only after it has
verified that the process is the reaper daemon of that state dir (its command line, and the status
file's pid and start time): a stale pidfile whose pid was reused by another process is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from reaper.cli.output import choose_format, print_plain
from reaper.config.load import load_state_dir
from reaper.config.schema import default_state_dir
from reaper.daemon.status import (
    LOCK_FILE,
    STATUS_FILE,
    STATUS_HEARTBEAT_SECONDS,
    CostStatus,
    DaemonStatus,
    LaneStatus,
    LatenessBuckets,
    SourceStatus,
    read_status_file,
)

STALE_AFTER_SECONDS = STATUS_HEARTBEAT_SECONDS + 20.0  # a file not refreshed on request: older means not responding
REFRESH_WAIT_SECONDS = 3.0  # how long `reaper status` waits for the fresh file it asked for
START_SLACK_SECONDS = 2.0  # clock-tick rounding between /proc's start time and the daemon's own clock


def state_dir_from(args: argparse.Namespace) -> Path:
    if getattr(args, "state_dir", None):
        return Path(args.state_dir)
    if getattr(args, "config", None):
        return load_state_dir(args.config)  # [collector] state_dir alone: no sources, no secrets
    return Path(default_state_dir(None))


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
    except (OSError, ValueError, TypeError, KeyError, orjson.JSONDecodeError):
        return None


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def ask_fresh_status(pid: int, path: Path, wait: float = REFRESH_WAIT_SECONDS) -> DaemonStatus | None:
    """SIGUSR2 to the daemon `pid` (verified by the caller), then the status file it writes in answer
    (one written after the signal), or None when none came within `wait` seconds."""
    asked = time.time()
    try:
        os.kill(pid, signal.SIGUSR2)
    except OSError:
        return None
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = _read(path)
        if status is not None and status.pid == pid and status.updated_wall > asked:
            return status
        time.sleep(0.05)
    return None


def _daemon_to_ask(args: argparse.Namespace, path: Path, status: DaemonStatus) -> int | None:
    """The pid to ask for a fresh status: --pidfile's or the status file's, only once verified to be the
    daemon of this state dir (a stale file's reused pid is never signalled); None otherwise."""
    if getattr(args, "pidfile", None):
        found = our_daemon(args)  # says why not, on stderr
        return None if isinstance(found, int) else found[0]
    if status.pid <= 1 or not pid_alive(status.pid) or why_not_our_daemon(status.pid, status, path) is not None:
        return None
    return status.pid


def show_status(args: argparse.Namespace) -> int:
    """Ask the running daemon for a fresh status file, then print it; with no daemon to ask, print the
    file as it is, with its age."""
    path = state_dir_from(args) / STATUS_FILE
    status = _read(path)
    if status is None and getattr(args, "pidfile", None) and not getattr(args, "state_dir", None):
        with contextlib.suppress(OSError, ValueError):  # the daemon's own state_dir (the config's was edited)
            own = process_state_dir(int(Path(args.pidfile).read_text().strip()))
            if own is not None:
                path, status = own / STATUS_FILE, _read(own / STATUS_FILE)
    if status is None:
        print(f"{path}: no status file: is reaper running with this state_dir? "
              "(use --config or --state-dir)", file=sys.stderr)
        return 1
    pid = _daemon_to_ask(args, path, status)
    fresh = ask_fresh_status(pid, path) if pid is not None else None
    status = fresh or _read(path) or status
    now = time.time()
    age = now - status.updated_wall
    alive = pid_alive(status.pid)
    if fresh is not None:
        state = "running"
    elif pid is not None:  # asked, no answer
        state = "not responding" if pid_alive(pid) else "not running"
    else:
        state = "running" if alive and age < STALE_AFTER_SECONDS else ("not running" if not alive else "not responding")
    code = 0 if state == "running" else 1
    fmt = "json" if args.json else choose_format(getattr(args, "format", None))
    if fmt == "json":
        print(path.read_text().rstrip("\n"))
        return code
    if fmt == "plain":
        _print_status_plain(status, state, now)
        return code
    console = Console()
    console.print(f"reaper {status.version} pid {status.pid}: [bold]{state}[/bold], up "
                  f"{(status.updated_wall - status.started_wall) / 60:.0f} min, config {status.config_path}, "
                  f"{status.reloads} reloads ({status.reload_failures} rejected), "
                  f"{status.tasks - status.io_tasks} tasks (+{status.io_tasks} socket watchers); "
                  f"status written {age:.0f}s ago")
    if status.tick_lateness is not None and status.tick_lateness.total:
        console.print(f"ticks behind schedule (all sources, since start): {_lateness_text(status.tick_lateness)}")
    sources = Table(title=f"{len(status.sources)} sources", title_justify="left")
    for col in ("source", "status", "last tick", "next tick", "ticks", "rows", "errors", "degraded", "lateness p99",
                "lanes (statements last/total)", "server cost (top 3; stretched)", "last error"):
        sources.add_column(col, overflow="fold")
    for s in status.sources:
        sources.add_row(
            s.name, s.status, _ago(now - s.last_tick_wall if s.last_tick_wall else None),
            "-" if s.next_tick_in is None else f"in {s.next_tick_in:.0f}s", str(s.ticks), str(s.rows),
            str(s.metric_errors), ", ".join(_alone(s)) or "-", f"{s.lateness_p99 * 1000:.0f} ms",
            _lanes(s.lanes), _cost(s.cost), s.last_error or "-")
    console.print(sources)
    sinks = Table(title=f"{len(status.sinks)} sinks", title_justify="left")
    for col in ("sink", "queued", "sent", "spilled", "on disk", "dropped", "not writing because"):
        sinks.add_column(col, overflow="fold")
    for k in status.sinks:
        sinks.add_row(k.label, str(k.queued), str(k.sent), str(k.spilled), f"{k.spill_bytes:,} B", str(k.dropped),
                      k.error or "-")
    console.print(sinks)
    if status.fleet is not None:
        f = status.fleet
        state = "left (drained)" if f.leaving else ("connected" if f.connected else f"disconnected: {f.error or '?'}")
        fleet = Table(title=f"fleet member {f.member}: {state}, owns {f.owned} sources, {len(f.members)} live members",
                      title_justify="left")
        for col in ("member", "sources", "owns"):
            fleet.add_column(col, overflow="fold")
        for m in f.members:
            fleet.add_row(m.name + (" (this)" if m.this else ""), str(len(m.sources)), ", ".join(m.sources) or "-")
        console.print(fleet)
    return code


def _lateness_text(buckets: LatenessBuckets) -> str:
    """`p50 <= 1 ms, p99 <= 10 ms over 1234 ticks` (bucket bounds: upper bounds of the quantiles)."""
    def bound(q: float) -> str:
        value = buckets.quantile(q)
        return "-" if value is None else ("over 10 s" if value == float("inf") else f"<= {value * 1000:g} ms")
    return f"p50 {bound(0.5)}, p99 {bound(0.99)} over {buckets.total} ticks"


def _print_status_plain(status: DaemonStatus, state: str, now: float) -> None:
    """`daemon<TAB>pid<TAB>state<TAB>version<TAB>config<TAB>uptime s<TAB>reloads<TAB>rejected<TAB>status age s`,
    then `source<TAB>name<TAB>status<TAB>last tick s ago<TAB>next tick in s<TAB>ticks<TAB>rows<TAB>errors
    <TAB>degraded<TAB>lateness p99 ms<TAB>last error` per source, each followed by `cost<TAB>source<TAB>metric
    <TAB>server ms per minute<TAB>rows per minute<TAB>interval s<TAB>effective interval s` per metric (most
    expensive first), and `sink<TAB>label<TAB>queued<TAB>sent<TAB>spilled<TAB>bytes on disk<TAB>dropped<TAB>why it
    is not writing (empty: it is)` per sink;
    `lateness<TAB>ticks<TAB>p50 ms<TAB>p99 ms` after the daemon line: all sources' ticks since start, each
    quantile as the upper bound of its bucket (`inf` over 10 s)."""
    print_plain("daemon", status.pid, state, status.version, status.config_path,
                round(status.updated_wall - status.started_wall), status.reloads, status.reload_failures,
                round(now - status.updated_wall))
    if status.tick_lateness is not None:
        quantiles = [status.tick_lateness.quantile(q) for q in (0.5, 0.99)]
        print_plain("lateness", status.tick_lateness.total, *(None if v is None else f"{v * 1000:g}"
                                                              for v in quantiles))
    for s in status.sources:
        print_plain("source", s.name, s.status, None if s.last_tick_wall is None else round(now - s.last_tick_wall),
                    None if s.next_tick_in is None else round(s.next_tick_in), s.ticks, s.rows, s.metric_errors,
                    ",".join(_alone(s)), round(s.lateness_p99 * 1000), s.last_error)
        for mc in s.cost.metrics if s.cost is not None else ():  # reaper.daemon.cost
            print_plain("cost", s.name, mc.metric, round(mc.server_ms_per_minute, 1), round(mc.rows_per_minute, 1),
                        mc.interval, mc.effective_interval)
    for k in status.sinks:
        print_plain("sink", k.label, k.queued, k.sent, k.spilled, k.spill_bytes, k.dropped, k.error)
    if status.fleet is not None:  # `fleet<TAB>member<TAB>connected|disconnected|left<TAB>owned<TAB>live members`,
        f = status.fleet  # then `member<TAB>name<TAB>this<TAB>sources owned<TAB>names` per live member
        print_plain("fleet", f.member, "left" if f.leaving else ("connected" if f.connected else "disconnected"),
                    f.owned, len(f.members))
        for m in f.members:
            print_plain("member", m.name, "this" if m.this else "", len(m.sources), ",".join(m.sources))


# -- reload ------------------------------------------------------------------------------------------


def process_start_wall(pid: int) -> float | None:
    """When the process started (unix time), from /proc; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the parenthesised command name
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def process_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def process_state_dir(pid: int) -> Path | None:
    """The state_dir a running daemon uses: the folder of the lock file it holds open (reaper.daemon.root)."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = Path(os.readlink(f"/proc/{pid}/fd/{fd}"))
                if target.name == LOCK_FILE:
                    return target.parent
    except OSError:
        return None
    return None


def why_not_our_daemon(pid: int, status: DaemonStatus | None, status_path: Path) -> str | None:
    """None when `pid` is the reaper daemon that writes `status_path`; else why it is not (or cannot be
    shown to be) one."""
    argv = process_cmdline(pid)
    if argv is None:
        return f"cannot read /proc/{pid}/cmdline"
    if not any("reaper" in part for part in argv) or "run" not in argv:
        return f"process {pid} is not a `reaper run` daemon (it is `{' '.join(argv)[:120]}`)"
    if status is None:
        return f"no status file at {status_path} to confirm that process {pid} is its daemon"
    if status.pid != pid:
        return f"{status_path} belongs to process {status.pid}, not {pid}"
    started = process_start_wall(pid)
    if started is None:
        return f"cannot read the start time of process {pid}"
    if started > status.started_wall + START_SLACK_SECONDS:
        return (f"process {pid} started after the daemon of {status_path} did "
                "(the pid was reused by another process)")
    return None


def _cost(cost: CostStatus | None) -> str:
    """`2580 ms/min of 3000: slow 2250, db_stats 300, cheap 30; slow 2s->8s` (server ms per minute)."""
    if cost is None:
        return "-"
    budget = "" if cost.budget_ms_per_minute is None else f" of {cost.budget_ms_per_minute:.0f}"
    top = ", ".join(f"{m.metric} {m.server_ms_per_minute:.0f}" for m in cost.metrics[:3])
    stretched = ", ".join(f"{m.metric} {m.interval}s->{m.effective_interval}s" for m in cost.metrics
                          if m.effective_interval != m.interval)
    paused = "; heavy metrics paused" if cost.heavy_paused else ""
    stretched = f"; {stretched}" if stretched else ""
    return f"{cost.server_ms_per_minute:.0f} ms/min{budget}: {top or '-'}{stretched}{paused}"


def _alone(s: SourceStatus) -> list[str]:
    """The metrics out of the tick's batch: failing ones, and slow ones marked so (reaper.daemon.metrichealth)."""
    return [*s.degraded, *(f"{m}(slow)" for m in s.slow)]


def _lanes(lanes: Sequence[LaneStatus]) -> str:
    """`fast up 1/120; slow up 4/40 skipped 3`: per lane, connected or not, statements last run/total."""
    parts = []
    for lane in lanes:
        text = f"{lane.name} {'up' if lane.connected else '-'} {lane.statements_last_run}/{lane.statements_total}"
        parts.append(text + (f" skipped {lane.skipped}" if lane.skipped else "")
                     + (f" (cannot connect: {lane.error})" if lane.error else ""))
    return "; ".join(parts) or "-"


def our_daemon(args: argparse.Namespace) -> tuple[int, Path, DaemonStatus] | int:
    """The pid in --pidfile (else the one in the status file of --config's or --state-dir's state dir), verified
    to be the reaper daemon of this state dir (so a reused pid is never signalled), with its status file and
    status; or the exit code after one line saying why not."""
    if not getattr(args, "pidfile", None):
        path = state_dir_from(args) / STATUS_FILE
        status = _read(path)
        if status is None:
            print(f"{path}: no status file: is reaper running with this config? (use --config, --state-dir or "
                  "--pidfile)", file=sys.stderr)
            return 1
        if status.pid <= 1 or not pid_alive(status.pid):
            print(f"{path}: its daemon (pid {status.pid}) is not running", file=sys.stderr)
            return 1
        reason = why_not_our_daemon(status.pid, status, path)
        if reason is not None:
            print(f"{path}: not signalling process {status.pid}: {reason}", file=sys.stderr)
            return 1
        return status.pid, path, status
    try:
        pid = int(Path(args.pidfile).read_text().strip())
    except (OSError, ValueError) as e:
        print(f"{args.pidfile}: cannot read a pid: {e}", file=sys.stderr)
        return 1
    if pid <= 1 or not pid_alive(pid):
        print(f"{args.pidfile}: process {pid} is not running", file=sys.stderr)
        return 1
    path = state_dir_from(args) / STATUS_FILE
    status = _read(path)
    if (status is None or status.pid != pid) and not getattr(args, "state_dir", None):
        own = process_state_dir(pid)  # the config's state_dir was edited since the daemon started
        if own is not None and own / STATUS_FILE != path:
            path, status = own / STATUS_FILE, _read(own / STATUS_FILE)
    reason = why_not_our_daemon(pid, status, path)
    if reason is not None or status is None:
        print(f"{args.pidfile}: not signalling process {pid}: {reason}", file=sys.stderr)
        return 1
    return pid, path, status


def reload_daemon(args: argparse.Namespace) -> int:
    """`reaper reload`: signal the daemon, wait for its answer, print the plan it carried out (or the
    lines it refused the config for). With --plan: only print what it would do (reaper.cli.planview)."""
    fmt = choose_format(getattr(args, "format", None))
    if getattr(args, "plan", False):
        from reaper.cli.planview import plan_against_running

        return plan_against_running(getattr(args, "config", None), state_dir_from(args), fmt)
    found = our_daemon(args)
    if isinstance(found, int):
        return found
    pid, path, before = found
    os.kill(pid, signal.SIGHUP)
    return _await_answer(pid, path, before, args.wait, fmt)


def _await_answer(pid: int, path: Path, before: DaemonStatus, wait: float, fmt: str) -> int:
    from reaper.cli.planview import print_plan

    deadline = time.monotonic() + wait
    answered = before.reloads + before.reload_failures
    while time.monotonic() < deadline:
        now = _read(path)
        if now is not None and now.reloads + now.reload_failures > answered:
            record = now.last_reload
            if now.reloads > before.reloads:
                if record is None or not record.applied:  # a daemon that does not record plans
                    print(f"reload applied (pid {pid}): {len(now.sources)} sources, {len(now.sinks)} sinks")
                    return 0
                if fmt == "plain":
                    print(f"reload applied (pid {pid}): {record.plan.summary()}")
                print_plan(record.plan, fmt, title=f"reload of {record.config_path} (pid {pid}) applied",
                           unchanged=False, config=record.config_path, pid=pid, applied=True, refused=False)
                return 0
            print(f"reload rejected (pid {pid}): the config is invalid; the daemon keeps running its old config:",
                  file=sys.stderr)
            lines = record.plan.errors if record is not None and not record.applied else ()
            for line in lines:
                print(f"  {line}", file=sys.stderr)
            if not lines:
                print(f"  run `reaper check --config {now.config_path}` to see every problem", file=sys.stderr)
            return 1
        if not pid_alive(pid):
            print(f"reload: the daemon (pid {pid}) exited while reloading; its log says why", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"no answer from pid {pid} within {wait:g}s (the reload may still be in progress: `reaper status` "
          "shows its reload count)", file=sys.stderr)
    return 1
