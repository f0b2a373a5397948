"""reaper's benchmark harness: `python bench/run.py SCENARIO [--duration S]` (or `just bench SCENARIO`).

For one scenario it starts its own PostgreSQL 15 (loopback only), creates the databases, two
pg_monitor roles and a light pgbench-like workload, runs a real `reaper run` process for the
duration next to the peer (Debian's prometheus-postgres-exporter, scraped at reaper's tick), and
measures both from outside: RSS and CPU every second (psutil), reaper's status file (tasks, ticks,
lateness, rows), pg_stat_statements per role, server backend CPU. A second short run of reaper
under an allocation-counting shim gives its allocation rate. Then it rewrites the scenario's
section of docs/benchmarks.md and docs/bench/<scenario>.png. Everything it starts is stopped at
the end, also on Ctrl-C or an error.

Scenarios: seed (6 sources x debug), fleet100 (100 x exhaustive), fleet1000 (1000 x basic),
sink (bench/bench_pgsink.py: the postgres sink's COPY throughput).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # the throwaway-server helper (tests/pgserver.py)

import baseline  # noqa: E402
import lab  # noqa: E402
import measure  # noqa: E402
import peer as peer_mod  # noqa: E402
import report  # noqa: E402

log = logging.getLogger("bench")
RUN_ROOT = Path(os.environ.get("REAPER_BENCH_ROOT", "/var/tmp/reaper-bench"))


@attrs.frozen
class Scenario:
    name: str
    title: str
    sources: int = 0
    preset: str = ""
    databases: int = 0
    duration: float = 150.0  # seconds of the measured run
    workload_rate: float = 20.0  # workload transactions per second (all databases together)
    startup_allowance: float = 30.0  # seconds start-up may take (connect storm, first round): the default
    # --duration adds it so that metrics due every 300 s run inside the steady window


SCENARIOS: dict[str, Scenario] = {
    # 600 s: the peer's CPU over the window is then ~0.1 s (in 150 s runs, read in utime+stime's 10 ms clock
    # ticks, its per-series figure moved 6.0-9.0 us between runs of one build; the CPU is now read exactly)
    "seed": Scenario("seed", "6 sources x `debug` (every metric at 30 s): the batch redesign's setup",
                     sources=6, preset="debug", databases=6, duration=600.0),
    "fleet100": Scenario("fleet100", "100 sources x `exhaustive`: pgwatch's sizing-guide fleet",
                         sources=100, preset="exhaustive", databases=100, startup_allowance=60.0),
    "fleet1000": Scenario("fleet1000", "1000 sources x `basic` (10 sources per database, 100 databases)",
                          sources=1000, preset="basic", databases=100, duration=300.0, startup_allowance=120.0),
    "sink": Scenario("sink", "postgres sink throughput (binary COPY), from bench/bench_pgsink.py"),
}


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the harness dies, however it dies (Linux)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# -- facts about the machine and the software --------------------------------------------------

def machine_facts(server: Any | None, peer_version: str | None) -> dict[str, Any]:
    import psutil

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=10"],
                            capture_output=True, text=True).stdout.strip() or "?"
    from reaper import __version__

    pg = server.psql("select version()").split(" on ")[0] if server is not None else "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(), "postgres": pg,
        "reaper": f"{__version__} ({commit})", "peer": peer_version or "not run",
        "load_before": round(os.getloadavg()[0], 2),
    }


# -- reaper's config and process ---------------------------------------------------------------

def write_config(path: Path, scenario: Scenario, server: Any, state_dir: Path, output: Path) -> None:
    dbs = lab.database_names(scenario.databases)
    lines = ["# written by bench/run.py", "[collector]", f'state_dir = "{state_dir}"', ""]
    for i in range(scenario.sources):
        db = dbs[i % len(dbs)]
        lines += ["[[sources]]", f'name = "s{i + 1:04d}"',
                  f'dsn = "{server.dsn(user=lab.REAPER_ROLE, dbname=db)}"', f'preset = "{scenario.preset}"', ""]
    lines += ["[[sinks]]", 'type = "jsonfile"', f'path = "{output}"', ""]
    path.write_text("\n".join(lines))


def start_reaper(config: Path, logfile: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra_env or {})
    with open(logfile, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "reaper.cli", "run", "--config", str(config)],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=ROOT, preexec_fn=die_with_parent)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> float | None:
    """SIGTERM (reaper shuts down gracefully), then SIGKILL. Returns the seconds it took."""
    if proc is None or proc.poll() is not None:
        return None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic() - t0


class StatusAsker:
    """Asks reaper to write its status file now (SIGUSR2), at most every `every` seconds: a reaper that
    writes it only when something changed (and on a slow heartbeat) would otherwise show start-up late
    and give the snapshots stale counters. Only when the process catches SIGUSR2 (an older reaper does
    not, and the signal would end it); it then wrote the file every few seconds anyway."""

    def __init__(self, proc: subprocess.Popen[bytes], every: float = 3.0) -> None:
        self.proc, self.every, self.last = proc, every, -math.inf

    def maybe_ask(self) -> None:
        if time.monotonic() - self.last >= self.every:
            self.ask()

    def ask(self) -> bool:
        self.last = time.monotonic()
        if self.proc.poll() is None and measure.handles_signal(self.proc.pid, signal.SIGUSR2):
            self.proc.send_signal(signal.SIGUSR2)
            return True
        return False


def read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = json.loads((state_dir / "status.json").read_bytes())
        return result
    except (OSError, ValueError):
        return None


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- pg_stat_statements ------------------------------------------------------------------------

def classify(query: str) -> str:
    q = " ".join(query.split()).lower()
    if q.startswith("select pg_is_in_recovery()"):
        return "combined"
    # connecting: reaper's server facts, asyncpg's type introspection (and its jit toggle around it)
    if ("as rec, current_database()" in q or "pg_control_system" in q or "typeinfo" in q
            or "from pg_catalog.pg_type" in q or ("as cur, set_config(" in q)):
        return "setup"
    # what gives a metric that runs alone its own statement_timeout (and the default back: reset)
    if q in ("begin", "commit", "rollback") or q.startswith(("begin ", "start transaction", "set ", "reset ")) \
            or q.startswith("select set_config("):
        return "wrapper"
    return "other"  # a metric run alone, a special metric's own queries, an isolation re-run


def statement_summary(before: list[dict[str, Any]], after: list[dict[str, Any]], sources: int,
                      ticks: int) -> dict[str, Any]:
    """Reaper's statements: set-up (once per connection) over the whole run; per source tick (ticks from
    the status file, read just before each pg_stat_statements snapshot) over the window."""
    prev = {s["query"]: s for s in before}
    cats: dict[str, dict[str, float]] = {}
    setup_calls = connects = 0
    entries = []
    for s in after:
        cat = classify(s["query"])
        p = prev.get(s["query"], {"calls": 0, "exec_ms": 0.0, "rows": 0})
        d_calls, d_ms = s["calls"] - p["calls"], s["exec_ms"] - p["exec_ms"]
        if cat == "setup":
            setup_calls += s["calls"]
        c = cats.setdefault(cat, {"calls": 0, "exec_ms": 0.0, "entries": 0})
        c["calls"] += d_calls
        c["exec_ms"] += d_ms
        c["entries"] += 1
        if "as rec, current_database()" in " ".join(s["query"].split()).lower():
            connects += d_calls
        entries.append({"category": cat, "calls": s["calls"], "window_calls": d_calls, "window_ms": d_ms,
                        "max_ms": s.get("max_ms"),
                        "query": " ".join(s["query"].split())[:110]})
    per_tick = {k: (v["calls"] / ticks if ticks else 0.0) for k, v in cats.items() if k != "setup"}
    window_calls = sum(v["calls"] for k, v in cats.items() if k != "setup")
    window_ms = sum(v["exec_ms"] for k, v in cats.items() if k != "setup")
    entries.sort(key=lambda e: -e["window_ms"])
    return {
        "ticks_in_window": ticks,
        "combined_in_window": cats.get("combined", {}).get("calls", 0),
        "per_tick_total": window_calls / ticks if ticks else None,
        "per_tick": per_tick,
        "distinct_combined_statements": cats.get("combined", {}).get("entries", 0),
        "setup_per_source": setup_calls / sources if sources else 0,
        "connects_in_window": connects,
        "exec_ms_per_tick": window_ms / ticks if ticks else None,
        "top": entries[:12],
    }


def lane_summary(st0: dict[str, Any], st1: dict[str, Any], ticks: int) -> dict[str, Any]:
    """Statements per lane over the window, from the status file's per-source `lanes` (the fast lane: the
    tick, connection 1; slow: the metrics that run alone and the special metrics, connection 2; local: no
    connection of its own). Summed over sources; a counter that went down (the source was restarted)
    counts from zero. {lane: {statements, runs, skipped, per_run, per_tick}}, per_tick over source ticks."""
    before = {s["name"]: {lane["name"]: lane for lane in s.get("lanes") or ()} for s in st0["sources"]}
    sums: dict[str, dict[str, int]] = {}
    for src in st1["sources"]:
        for lane in src.get("lanes") or ():
            prev = before.get(src["name"], {}).get(lane["name"], {})
            acc = sums.setdefault(lane["name"], {"statements": 0, "runs": 0, "skipped": 0})
            for key, field in (("statements", "statements_total"), ("runs", "runs"), ("skipped", "skipped")):
                now, was = lane.get(field, 0), prev.get(field, 0)
                acc[key] += now - was if now >= was else now
    out: dict[str, Any] = {}
    for name, acc in sums.items():
        out[name] = {**acc, "per_run": acc["statements"] / acc["runs"] if acc["runs"] else None,
                     "per_tick": acc["statements"] / ticks if ticks else None}
    return out


def peer_statement_summary(before: list[dict[str, Any]], after: list[dict[str, Any]], scrapes: int) -> dict[str, Any]:
    prev = {s["query"]: s for s in before}
    calls = sum(s["calls"] - prev.get(s["query"], {"calls": 0})["calls"] for s in after)
    ms = sum(s["exec_ms"] - prev.get(s["query"], {"exec_ms": 0.0})["exec_ms"] for s in after)
    return {"per_scrape": calls / scrapes if scrapes else None, "exec_ms_per_scrape": ms / scrapes if scrapes else None,
            "distinct": len(after)}


# -- the jsonfile output -----------------------------------------------------------------------

NOT_VALUES = {"epoch_ns", "real_dbname", "sys_id"}


def count_output(path: Path) -> dict[str, Any]:
    """Measurements, rows and numeric values (what a Prometheus series holds one of) in the sink's file."""
    import orjson

    measurements = rows = values = 0
    per_metric: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    m = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                measurements += 1
                data = m.get("data") or []
                rows += len(data)
                per_metric[m.get("metric", "?")] = per_metric.get(m.get("metric", "?"), 0) + len(data)
                for row in data:
                    values += sum(1 for k, v in row.items() if not k.startswith("tag_") and k not in NOT_VALUES
                                  and isinstance(v, int | float) and not isinstance(v, bool))
    except OSError:
        pass
    return {"measurements": measurements, "rows": rows, "values": values, "per_metric_rows": per_metric}


# -- py-spy ------------------------------------------------------------------------------------

def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists() and shutil.which(exe) is None:
        log.warning("py-spy not found (pip install py-spy); no profile")
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "200",
           "--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any] | None:
    """Collapsed stacks -> the innermost functions with the most samples (self), and reaper's own
    functions by the samples they are on the stack of (total; the CLI's frames, on every stack, left out)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    self_s: dict[str, int] = {}
    total_s: dict[str, int] = {}
    samples = in_threads = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        samples += n
        if frames[0].startswith("Thread._bootstrap"):
            in_threads += n
        self_s[_short(frames[-1])] = self_s.get(_short(frames[-1]), 0) + n
        for fr in {_short(fr) for fr in frames if _is_reaper(fr)}:
            total_s[fr] = total_s.get(fr, 0) + n
    if not samples:
        return None

    def ranked(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / samples, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": samples, "threads_pct": round(100 * in_threads / samples, 1), "self": ranked(self_s),
            "total": ranked(total_s)}


def _is_reaper(frame: str) -> bool:
    """A frame of reaper's own code (py-spy shows paths relative to sys.path), other than the CLI's."""
    return ("(reaper/" in frame or "/reaper/reaper/" in frame or "/main/reaper/" in frame) \
        and "reaper/cli.py" not in frame


def _short(frame: str) -> str:
    """`func (/long/path/pkg/mod.py:123)` -> `func (pkg/mod.py:123)`."""
    if "(" in frame and frame.endswith(")"):
        name, _, where = frame.rpartition(" (")
        where = where[:-1]
        parts = where.split("/")
        where = "/".join(parts[-2:]) if len(parts) > 1 else where
        return f"{name} ({where})"
    return frame


# -- one scenario ------------------------------------------------------------------------------

def default_duration(sc: Scenario) -> float:
    """The scenario's own length, or longer: metrics due every 300 s (or less) run inside the steady window,
    which starts once start-up is over (the scenario's allowance for it; at 15 % of the run at the earliest)
    and is then at least the longest such interval plus 40 s. Rounded up to 50 s."""
    intervals = [i for i in active_intervals(sc.preset).values() if i <= 300]
    longest = max(intervals, default=0)
    if longest < 120:
        return sc.duration
    need = max(longest + 40.0 + sc.startup_allowance, (longest + 40.0) / 0.85)
    return max(sc.duration, 50.0 * math.ceil(need / 50.0))


def run_collector_scenario(sc: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    duration = float(args.duration or default_duration(sc))
    run_dir = RUN_ROOT / f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    state_dir, output, config = run_dir / "state", run_dir / "measurements.ndjson", run_dir / "reaper.toml"
    dbs = lab.database_names(sc.databases)
    workload_conns = min(len(dbs), 40)
    # reaper's two connections per source at most (the fast lane's and the slow lane's, open for the whole
    # run when a source has slow-lane work every few minutes: fleet100's change_events), the peer's one per
    # database, the workload's: a full server refused one fleet100 source its first connect at 18:11 UTC on
    # 2026-12-04 (290 slots: 99 sources up, the steady window from 60 % of the run)
    max_conn = 2 * sc.sources + workload_conns + (len(dbs) + 10) + 40
    server = workload = peer = reaper = profiler = None
    sampler = measure.Sampler()
    result: dict[str, Any] = {"scenario": sc.name, "title": sc.title, "sources": sc.sources, "preset": sc.preset,
                              "databases": sc.databases, "duration_s": duration,
                              "command": " ".join(["python bench/run.py", *sys.argv[1:]])}
    try:
        log.info("%s: PostgreSQL 15 with max_connections=%d, %d databases", sc.name, max_conn, len(dbs))
        server = lab.start_server(max_conn)
        lab.prepare(server, dbs)
        workload = lab.Workload(server, dbs, sc.workload_rate, max_connections=workload_conns)
        workload.start()
        peer_bin, peer_version = (None, "skipped (--no-peer)") if args.no_peer else peer_mod.find_or_install()
        if peer_bin is None:
            log.warning("peer: %s", peer_version)
        result["machine"] = machine_facts(server, peer_version if peer_bin else None)
        write_config(config, sc, server, state_dir, output)
        from reaper.catalog.metrics import Catalog
        from reaper.config.load import load_config
        from reaper.schedule import tick_seconds

        cfg = load_config(config)
        catalog = Catalog.for_config(cfg)
        intervals = catalog.intervals(cfg.sources[0], standby=False)
        tick = tick_seconds(intervals)
        result["tick_s"] = tick
        result["metrics_active"] = len(intervals)
        result["intervals"] = intervals
        time.sleep(2)  # the workload's first statements, so the first tick sees some
        lab.reset_statements(server)

        # -- the measured run --
        sampler.start()
        t_start = sampler.now()
        reaper = start_reaper(config, run_dir / "reaper.log")
        asker = StatusAsker(reaper, every=max(3.0, sc.sources / 100))  # building it costs per source
        sampler.add("reaper", reaper.pid)
        if peer_bin is not None:
            peer = peer_mod.Peer(peer_bin, server.dsn(user=lab.PEER_ROLE, dbname="postgres") + "?sslmode=disable",
                                 tick, run_dir, clock=sampler.now)
            peer.preexec = die_with_parent
            peer.start()
            assert peer.pid is not None
            sampler.add("peer", peer.pid)
            peer.start_scraping(first_delay=3.0)
        log.info("%s: reaper (pid %d)%s running for %.0fs (tick %ds, %d active metrics per source)", sc.name,
                 reaper.pid, f" and the peer (pid {peer.pid})" if peer else "", duration, tick, len(intervals))
        statuses: list[tuple[float, dict[str, Any]]] = []
        t_first_round = None
        t_warm = None
        snap: dict[str, Any] = {}
        first_status_at = None
        while sampler.now() < duration:
            time.sleep(1.0)
            if reaper.poll() is not None:
                raise RuntimeError(f"reaper exited with {reaper.returncode}:\n{log_tail(run_dir / 'reaper.log')}")
            if t_warm is None:  # start-up: ask for the status often enough to see its end
                asker.maybe_ask()
            st = read_status(state_dir)
            if st is None:
                continue
            now = sampler.now()
            if first_status_at is None:
                first_status_at = now
            if not statuses or statuses[-1][1]["updated_wall"] != st["updated_wall"]:
                statuses.append((now, st))
            if t_first_round is None and all_up(st, sc.sources):
                t_first_round = now
            elif t_first_round is None and now >= 0.6 * duration:  # some never came up: measure anyway
                t_first_round = now
                result["not_up_at_warm"] = sum(1 for s in st["sources"] if s["status"] != "up") + \
                    max(0, sc.sources - len(st["sources"]))
            peer_ready = peer is None or len(peer.scrapes) >= 1
            if t_warm is None and t_first_round is not None and peer_ready and now >= max(0.15 * duration,
                                                                                          t_first_round + 2):
                t_warm = now
                snap = take_snapshot(server, sampler, peer, state_dir, statuses, asker)
                log.info("%s: steady window from t=%.0fs", sc.name, t_warm)
                if args.profile:
                    profiler = start_profile(reaper.pid, duration - now - 2, run_dir / "profile.txt")
        if t_warm is None:
            raise RuntimeError("reaper never finished its first round of ticks (see "
                               f"{run_dir / 'reaper.log'}):\n{log_tail(run_dir / 'reaper.log')}")
        end = take_snapshot(server, sampler, peer, state_dir, statuses, asker)
        t_end = sampler.now()
        (run_dir / "pg_stat_statements.json").write_text(json.dumps(end["reaper_stmts"], indent=1))
        result["reaper_peak_rss"] = measure.peak_rss(reaper.pid)
        result["peer_peak_rss"] = measure.peak_rss(peer.pid) if peer and peer.pid else None
        if peer is not None:
            peer.stop()
        if profiler is not None:
            try:
                profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                profiler.terminate()
        result["machine"]["load_end"] = round(os.getloadavg()[0], 2)  # other work on the machine shows here
        result["shutdown_s"] = stop_process(reaper)
        sampler.stop()
        final_status = read_status(state_dir)
        # the yardsticks, in the same run (the workload still going): a bare asyncpg round trip's CPU
        log.info("%s: baseline: bare asyncpg select 1 loops (plain asyncio, through trio-asyncio)", sc.name)
        result["baseline"] = baseline.measure(server.dsn(user=lab.REAPER_ROLE, dbname=dbs[0]))
        # reaper with one source of the same preset, same sink, same server: the base of the marginal RSS
        if sc.sources > 1:
            result["one_source"] = one_source_rss(sc, server, run_dir, tick)

        result.update(compute(sc, sampler, statuses, snap, end, t_warm, t_end, duration, first_status_at,
                              final_status, peer))
        result["reaper"]["startup_cpu"] = startup_summary(sampler.samples["reaper"], t_start)
        result["t_start"] = t_start
        one = result.get("one_source") or {}
        if one.get("rss_steady") and result["reaper"].get("rss_steady"):
            result["reaper"]["rss_marginal"] = (result["reaper"]["rss_steady"] - one["rss_steady"]) / (sc.sources - 1)
        result["output"] = count_output(output)
        out = result["output"]
        window_rows = result["reaper"]["rows_window"]
        if out["rows"]:
            result["reaper"]["values_per_row"] = out["values"] / out["rows"]
            result["reaper"]["values_window"] = window_rows * out["values"] / out["rows"]
        if args.profile:
            result["profile"] = summarize_profile(run_dir / "profile.txt")

        # -- the allocation probe: a second, short run under the counting shim --
        if args.alloc_seconds != 0:
            result["alloc"] = alloc_probe(config, run_dir, state_dir, sc, args.alloc_seconds
                                          or alloc_default_seconds(tick, intervals), tick)
        result["workload"] = {"rate": sc.workload_rate, "transactions": workload.transactions,
                              "errors": workload.errors}
        result["samples"] = {name: [(round(s["t"], 1), int(s["rss"]), round(s["cpu"], 3)) for s in samples]
                             for name, samples in sampler.samples.items()}
        result["t_warm"], result["t_end"] = t_warm, t_end
        return result
    finally:
        # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sampler.stop()
        if profiler is not None and profiler.poll() is None:
            profiler.terminate()
        if peer is not None:
            peer.stop()
        stop_process(reaper)
        if workload is not None:
            workload.stop()
        if server is not None:
            server.cleanup()
        if args.keep:
            log.info("kept %s", run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def take_snapshot(server: Any, sampler: measure.Sampler, peer: peer_mod.Peer | None, state_dir: Path,
                  statuses: list[tuple[float, dict[str, Any]]], asker: StatusAsker) -> dict[str, Any]:
    """pg_stat_statements and backend CPU right after reaper rewrote its status file (asked for with
    SIGUSR2 when it takes it), so that the tick counts and the statement counts describe (nearly) the
    same instant."""
    st = read_status(state_dir)
    last = st["updated_wall"] if st is not None else None
    asker.ask()
    sources = len(statuses[-1][1]["sources"]) if statuses else 0
    deadline = time.monotonic() + max(7.0, sources / 100 + 3)  # a large fleet writes it every sources/100 s
    while time.monotonic() < deadline:
        st = read_status(state_dir)
        if st is not None and st["updated_wall"] != last:
            statuses.append((sampler.now(), st))
            break
        time.sleep(0.05)
    sampler.sample_once()
    reaper_pids = lab.backend_pids(server, lab.REAPER_ROLE)
    peer_pids = lab.backend_pids(server, lab.PEER_ROLE)
    return {
        "t": sampler.now(),
        "reaper_stmts": lab.statements_of(server, lab.REAPER_ROLE),
        "peer_stmts": lab.statements_of(server, lab.PEER_ROLE),
        "reaper_backend_cpu": measure.process_cpu(reaper_pids), "reaper_backends": len(reaper_pids),
        "peer_backend_cpu": measure.process_cpu(peer_pids), "peer_backends": len(peer_pids),
        "status": statuses[-1] if statuses else None,
        "peer_scrapes": len(peer.scrapes) if peer else 0,
    }


def compute(sc: Scenario, sampler: measure.Sampler, statuses: list[tuple[float, dict[str, Any]]],
            snap: dict[str, Any], end: dict[str, Any], t_warm: float, t_end: float, duration: float,
            first_status_at: float | None, final_status: dict[str, Any] | None,
            peer: peer_mod.Peer | None) -> dict[str, Any]:
    rs = sampler.samples["reaper"]
    win = t_end - t_warm
    cpu_w = measure.cpu_between(rs, t_warm, t_end)
    rss_win = [s["rss"] for s in measure.window(rs, t_warm, t_end)]
    cpu_series = measure.cpu_percent_series(rs)
    cpu_peaks = [c for t, c in cpu_series if t >= t_warm]
    # the status file: the last one of the steady window, and the one at its start
    (_, st0), (_, st1) = snap["status"], end["status"]
    d_t = st1["updated_wall"] - st0["updated_wall"]
    sum_src = lambda st, k: sum(s[k] for s in st["sources"])  # noqa: E731
    d_rows, d_meas = sum_src(st1, "rows") - sum_src(st0, "rows"), sum_src(st1, "measurements") - sum_src(st0,
                                                                                                        "measurements")
    d_ticks = sum_src(st1, "ticks") - sum_src(st0, "ticks")
    tasks_seen = [st["tasks"] for t, st in statuses if t >= t_warm]
    p50s = [s["lateness_p50"] for s in st1["sources"]]
    p99s = [s["lateness_p99"] for s in st1["sources"]]
    maxes = [s["lateness_max"] for s in st1["sources"]]
    pooled = measure.window_lateness(st0, st1)
    if not pooled["ticks"]:  # a build without the histogram: the sources' own figures
        pooled["p50_ms"] = 1000 * statistics.median(p50s) if p50s else None
        pooled["p99_ms"] = 1000 * max(p99s) if p99s else None
    statements = statement_summary(snap["reaper_stmts"], end["reaper_stmts"], sc.sources, d_ticks)
    lanes = lane_summary(st0, st1, d_ticks)
    if lanes:
        statements["lanes"] = lanes
        all_lanes = sum(v["statements"] for v in lanes.values())
        statements["lanes_per_tick_total"] = all_lanes / d_ticks if d_ticks else None
    rows_per_s = d_rows / d_t if d_t > 0 else 0.0
    reaper_r: dict[str, Any] = {
        "startup_s": first_status_at,
        "cpu_startup_s": measure.at(rs, t_warm, "cpu"),
        "cpu_window_s": cpu_w, "window_s": win,
        "cpu_pct": 100 * cpu_w / win if win > 0 else None,
        "cpu_pct_whole": 100 * (measure.at(rs, t_end, "cpu") - measure.at(rs, first_status_at or 0, "cpu"))
        / max(1e-9, t_end - (first_status_at or 0)),
        "cpu_pct_peak_5s": max(cpu_peaks) if cpu_peaks else None,
        "rss_steady": statistics.median(rss_win) if rss_win else None,
        "rss_at_25pct": measure.at(rs, 0.25 * duration, "rss"),
        "rss_end": measure.at(rs, t_end, "rss"),
        "threads": int(max(s["threads"] for s in measure.window(rs, t_warm, t_end))),
        "tasks": max(tasks_seen, default=st1["tasks"]), "tasks_min": min(tasks_seen, default=st1["tasks"]),
        "ticks_window": d_ticks, "status_window_s": d_t,
        "measurements_per_s": d_meas / d_t if d_t > 0 else 0.0, "rows_per_s": rows_per_s,
        "rows_window": d_rows, "rows_per_source_tick": d_rows / d_ticks if d_ticks else None,
        "cpu_per_row_us": 1e6 * cpu_w / (rows_per_s * win) if rows_per_s > 0 and win > 0 else None,
        # every source's ticks of the steady window pooled (the daemon's lateness histogram: bucket bounds);
        # the worst source's own p99 and max cover its recent ticks since start, start-up included
        "lateness_p50_ms": pooled["p50_ms"], "lateness_p99_ms": pooled["p99_ms"],
        "lateness_window_ticks": pooled["ticks"],
        "lateness_p99_worst_source_ms": 1000 * max(p99s) if p99s else None,
        "lateness_max_ms": 1000 * max(maxes) if maxes else None,
        "metric_errors": sum_src(st1, "metric_errors"),
        "degraded": sorted({d for s in st1["sources"] for d in s["degraded"]}),
        "down": sum(1 for s in st1["sources"] if s["status"] != "up"),
        "statements": statements,
        "backends": end["reaper_backends"],
        # trio-asyncio keeps one reader task per asyncio socket, i.e. per asyncpg connection; the status
        # file counts them apart (io_tasks) since f2f684a, else the backends held stand in for them
        "tasks_own": max(st["tasks"] - st.get("io_tasks", end["reaper_backends"])
                         for t, st in statuses if t >= t_warm) if tasks_seen else None,
        "backend_cpu_ms_per_tick": (1000 * (end["reaper_backend_cpu"] - snap["reaper_backend_cpu"])
                                    / statements["ticks_in_window"]) if statements["ticks_in_window"] else None,
        "final_status_totals": ({k: sum_src(final_status, k) for k in ("ticks", "measurements", "rows")}
                                if final_status else None),
    }
    result: dict[str, Any] = {"reaper": reaper_r}
    if peer is not None and "peer" in sampler.samples and sampler.samples["peer"]:
        ps = sampler.samples["peer"]
        scrapes = [s for s in peer.scrapes if t_warm <= s["t"] <= t_end]
        n = len(scrapes)
        p_cpu = measure.cpu_between(ps, t_warm, t_end)
        series = statistics.mean(s["series"] for s in scrapes) if scrapes else 0
        pg_series = statistics.mean(s["pg_series"] for s in scrapes) if scrapes else 0
        rss_p = [s["rss"] for s in measure.window(ps, t_warm, t_end)]
        pst = peer_statement_summary(snap["peer_stmts"], end["peer_stmts"], n)
        result["peer"] = {
            "scrapes_window": n, "scrapes_total": len(peer.scrapes), "failures": peer.failures,
            "http_status": sorted({s["status"] for s in peer.scrapes}),
            "cpu_window_s": p_cpu, "cpu_pct": 100 * p_cpu / win if win > 0 else None,
            "cpu_per_scrape_ms": 1000 * p_cpu / n if n else None,
            "cpu_in_scrape_ms": 1000 * statistics.mean(s["cpu_s"] for s in scrapes) if scrapes else None,
            "wall_per_scrape_ms": 1000 * statistics.mean(s["wall_s"] for s in scrapes) if scrapes else None,
            "series": series, "pg_series": pg_series,
            "cpu_per_series_us": 1e6 * p_cpu / (n * pg_series) if n and pg_series else None,
            "rss_steady": statistics.median(rss_p) if rss_p else None,
            "statements": pst, "backends": end["peer_backends"],
            "backend_cpu_ms_per_scrape": (1000 * (end["peer_backend_cpu"] - snap["peer_backend_cpu"]) / n) if n
            else None,
        }
    return result


def all_up(st: dict[str, Any] | None, sources: int) -> bool:
    """Every source connected and through its first tick (the end of start-up)."""
    return bool(st and len(st["sources"]) == sources
                and all(s["ticks"] >= 1 and s["status"] == "up" for s in st["sources"]))


def startup_summary(samples: list[dict[str, float]], t_start: float) -> dict[str, Any]:
    """Reaper's first minute from its start: CPU % of one core in each 5 s window, the highest, and the
    minute as a whole (issue 14: no 5 s window over 15 %)."""
    windows = measure.startup_windows(samples, t_start, 60.0, 5.0)
    return {"windows_pct": [round(w, 2) for w in windows], "peak_5s_pct": max(windows, default=None),
            "first_minute_pct": sum(windows) / len(windows) if windows else None, "step_s": 5.0}


def one_source_rss(sc: Scenario, server: Any, run_dir: Path, tick: int) -> dict[str, Any]:
    """RSS of reaper with ONE source of the scenario's preset (same sink, server and launcher), measured in
    the same run as the fleet: the base of the marginal memory per extra source. Median RSS over one tick
    (15-60 s) once the source is through its first tick."""
    one_dir = run_dir / "one"
    one_dir.mkdir(exist_ok=True)
    config, state = one_dir / "reaper.toml", one_dir / "state"
    write_config(config, attrs.evolve(sc, sources=1), server, state, one_dir / "measurements.ndjson")
    seconds = min(max(float(tick), 15.0), 60.0) + 5.0
    log.info("%s: one-source run (%s) for the marginal RSS, %.0fs after its first tick", sc.name, sc.preset, seconds)
    sampler = measure.Sampler()
    sampler.start()
    proc = start_reaper(config, one_dir / "reaper.log")
    sampler.add("one", proc.pid)
    asker = StatusAsker(proc, every=1.0)
    try:
        t0 = time.monotonic()
        while not all_up(read_status(state), 1):
            asker.maybe_ask()
            if proc.poll() is not None or time.monotonic() - t0 > 90:
                return {"skipped": "the one-source run did not get through its first tick"}
            time.sleep(0.5)
        t_up = sampler.now()
        time.sleep(seconds)
        rss = [s["rss"] for s in measure.window(sampler.samples["one"], t_up, sampler.now())]
        return {"rss_steady": statistics.median(rss) if rss else None, "rss_peak": measure.peak_rss(proc.pid),
                "window_s": seconds, "startup_s": t_up}
    finally:
        sampler.stop()
        stop_process(proc)


def alloc_default_seconds(tick: int, intervals: dict[str, int]) -> float:
    """The allocation probe's length: whole ticks covering at least 60 s, two ticks, and the metrics due
    every 120 s or less (longer ones are left to the main run: the probe is about the steady tick)."""
    frequent = max((i for i in intervals.values() if i <= 120), default=tick)
    return float(tick * math.ceil(max(60.0, 2.0 * tick, frequent) / tick))


def alloc_probe(config: Path, run_dir: Path, state_dir: Path, sc: Scenario, seconds: float,
                tick: int) -> dict[str, Any]:
    """Run reaper again with PYTHONMALLOC=malloc and the counting shim; bytes allocated per minute over
    `seconds`, starting one settling tick (at most 60 s) after every source is up and through its first
    tick (or after a time-out that grows with the sources: the window then says how many were not up)."""
    shim = measure.build_alloc_shim(run_dir)
    if shim is None:
        return {"skipped": "no C compiler to build bench/allocshim.c"}
    out = run_dir / "alloc.txt"
    with contextlib.suppress(FileNotFoundError):
        (state_dir / "status.json").unlink()
    env = {"LD_PRELOAD": str(shim), "PYTHONMALLOC": "malloc", "ALLOCSHIM_OUT": str(out)}
    log.info("%s: allocation probe: reaper under the counting shim, %.0fs after start-up", sc.name, seconds)
    proc = start_reaper(config, run_dir / "reaper-alloc.log", env)
    asker = StatusAsker(proc, every=max(3.0, sc.sources / 100))
    t0 = time.monotonic()
    marks: list[float] = []
    up_timeout = 120.0 + 0.4 * sc.sources
    t_up: float | None = None
    not_up = 0
    try:
        while not marks or time.monotonic() - marks[0] < seconds:
            time.sleep(0.5)
            if proc.poll() is not None:
                return {"skipped": f"reaper exited with {proc.returncode} under the shim"}
            if t_up is None:
                asker.maybe_ask()
                st = read_status(state_dir)
                if all_up(st, sc.sources) or time.monotonic() - t0 > up_timeout:
                    t_up = time.monotonic()
                    not_up = sc.sources if st is None else sum(
                        1 for s in st["sources"] if s["status"] != "up" or s["ticks"] < 1) + max(
                        0, sc.sources - len(st["sources"]))
            if not marks and t_up is not None and time.monotonic() - t_up >= min(float(tick), 60.0):
                proc.send_signal(measure.ALLOC_SIGNAL)
                marks.append(time.monotonic())
        proc.send_signal(measure.ALLOC_SIGNAL)
        marks.append(time.monotonic())
        time.sleep(0.3)
    finally:
        stop_process(proc)
    dumps = measure.read_alloc(out, proc.pid)
    if len(marks) < 2 or len(dumps) < 2:
        return {"skipped": "the probe did not get through its first round of ticks"}
    (b0, c0, r0), (b1, c1, r1) = dumps[0], dumps[1]
    minutes = (marks[1] - marks[0]) / 60
    return {"mb_per_min": (b1 - b0) / 1e6 / minutes, "allocs_per_min": (c1 - c0) / minutes,
            "realloc_full_mb_per_min": (r1 - r0) / 1e6 / minutes,
            "startup_mb": b0 / 1e6, "window_s": marks[1] - marks[0], "ticks": (marks[1] - marks[0]) / tick,
            "up_after_s": (t_up - t0) if t_up is not None else None, "not_up_at_start": not_up}


def run_sink_scenario(args: argparse.Namespace) -> dict[str, Any]:
    script = HERE / "bench_pgsink.py"
    result: dict[str, Any] = {"scenario": "sink", "title": SCENARIOS["sink"].title,
                              "machine": machine_facts(None, None)}
    if not script.exists():
        result["skipped"] = "bench/bench_pgsink.py does not exist yet"
        return result
    log.info("sink: running %s", script.relative_to(ROOT))
    result["machine"]["postgres"] = "15 (the script's own server)"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    result["machine"]["load_end"] = round(os.getloadavg()[0], 2)
    result["returncode"] = proc.returncode
    result["stdout"] = proc.stdout.strip()
    if proc.returncode != 0:
        result["stderr"] = proc.stderr.strip()[-2000:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--duration", type=float,
                        help="seconds of the measured run (default: the scenario's, long enough for its 300 s "
                             "metrics; a shorter one is fine for a quick run)")
    parser.add_argument("--no-peer", action="store_true", help="do not run the peer exporter")
    parser.add_argument("--alloc-seconds", type=float, default=None,
                        help="length of the allocation probe run (default: first round + 2 ticks; 0 skips it)")
    parser.add_argument("--profile", action="store_true", help="record a py-spy profile of the steady window")
    parser.add_argument("--keep", action="store_true", help=f"keep the run directory under {RUN_ROOT}")
    parser.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"), help="the report to update")
    parser.add_argument("--no-report", action="store_true", help="print the results; leave the report alone")
    parser.add_argument("--from-json", metavar="FILE",
                        help=f"render the report from a saved result ({RUN_ROOT}/last-SCENARIO.json), no run")
    parser.add_argument("--sources", type=int, help="experiment: another number of sources (implies --no-report)")
    parser.add_argument("--preset", help="experiment: another preset (implies --no-report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not args.no_report:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("the charts need matplotlib: pip install -e '.[bench]' (or pass --no-report)")
    if args.from_json:
        return finish(json.loads(Path(args.from_json).read_text()), args)
    from pgserver import cleanup_stale

    for leftover in cleanup_stale():  # servers of an earlier run that was killed
        log.info("removed a stale server directory: %s", leftover)
    sc = SCENARIOS[args.scenario]
    if args.sources or args.preset:
        sc = attrs.evolve(sc, sources=args.sources or sc.sources, preset=args.preset or sc.preset,
                          databases=min(sc.databases, args.sources or sc.sources))
        args.no_report = True
    try:
        result = run_sink_scenario(args) if sc.name == "sink" else run_collector_scenario(sc, args)
    except KeyboardInterrupt:
        log.error("interrupted: everything started was stopped")
        return 130
    return finish(result, args)


def active_intervals(preset: str) -> dict[str, int]:
    from reaper.catalog.metrics import Catalog
    from reaper.config.schema import SourceConfig

    source = SourceConfig(name="x", dsn="postgresql://x@127.0.0.1/x", preset=preset)
    return Catalog.for_config(None).intervals(source, standby=False)


def finish(result: dict[str, Any], args: argparse.Namespace) -> int:
    if "reaper" in result and "intervals" not in result:  # results saved before it was recorded
        result["intervals"] = active_intervals(result["preset"])
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    sc = SCENARIOS[result["scenario"]]
    experiment = "reaper" in result and (result["sources"], result["preset"]) != (sc.sources, sc.preset)
    name = f"{result['scenario']}-{result['sources']}x-{result['preset']}" if experiment else result["scenario"]
    saved = RUN_ROOT / f"last-{name}.json"  # to re-render with --from-json (an experiment does not replace it)
    saved.write_text(json.dumps(result, default=str))
    if args.no_report:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str))
        return 0
    path = Path(args.report)
    report.update(path, result)
    log.info("wrote %s%s", path, f" and {report.chart_path(path, sc.name)}" if "samples" in result else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
