"""Where a source tick's CPU goes: a quick lab for the hot path (issue 14), not a benchmark.

Runs a real `reaper run` on the bench's own PostgreSQL 15 with N sources on a preset whose every
metric is re-timed to a short interval (so a minute holds many ticks), twice: once plain, to measure
CPU per source tick from outside (psutil), and once under cProfile, to rank the functions. Prints
both; the numbers are for comparing two builds on one machine, not for the report.

    python bench/profile_tick.py --preset debug --sources 6 --interval 2 --seconds 40
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT / "tests"))

import lab  # noqa: E402

from reaper.catalog.metrics import SPECIAL_METRICS, load_shipped_definitions  # noqa: E402
from reaper.daemon.status import LatenessBuckets  # noqa: E402

PROFILED_RUN = """
import cProfile, signal, sys, time
from reaper.cli import main
prof = cProfile.Profile(time.thread_time)
signal.signal(signal.SIGRTMIN + 5, lambda *_: prof.enable())  # the steady window only, not start-up
try:
    main(["run", "--config", sys.argv[2]])
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(sys.argv[1])
"""


def write_config(path: Path, server: object, dbs: list[str], args: argparse.Namespace, state: Path,
                 out: Path) -> None:
    defs = load_shipped_definitions()
    metrics = defs.presets[args.preset].metrics
    if args.only != "all":  # SQL metrics alone, or the special (code-collected) ones alone
        want_special = args.only == "special"
        metrics = {n: v for n, v in metrics.items()
                   if (n in SPECIAL_METRICS or defs.metrics[n].special) == want_special}
    # --interval 0: the preset's own intervals (the seed scenario's mix of ticks), else all re-timed
    timed = ", ".join(f"{name} = {args.interval or interval}" for name, interval in sorted(metrics.items()))
    lines = ["[collector]", f'state_dir = "{state}"', "", "[presets.prof]", f"metrics = {{ {timed} }}", ""]
    for i in range(args.sources):
        dsn = server.dsn(user=lab.REAPER_ROLE, dbname=dbs[i % len(dbs)])  # type: ignore[attr-defined]
        lines += ["[[sources]]", f'name = "s{i + 1:04d}"', f'dsn = "{dsn}"', 'preset = "prof"', ""]
    lines += ["[[sinks]]", 'type = "jsonfile"', f'path = "{out}"', ""]
    path.write_text("\n".join(lines))


def ticks(state: Path, pid: int) -> tuple[int, int, LatenessBuckets | None]:
    """Ticks and rows of all sources, and the daemon's tick-lateness histogram, from a status file the
    daemon writes when asked (SIGUSR2)."""
    path = state / "status.json"
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_mtime_ns == before):
        time.sleep(0.05)
    try:
        st = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return 0, 0, None
    sources = st.get("sources", {})
    items = sources.values() if isinstance(sources, dict) else sources
    late = st.get("tick_lateness")
    buckets = None if not late else LatenessBuckets(le=tuple(late["le"]), counts=tuple(late["counts"]),
                                                     sum=float(late["sum"]))
    return (sum(int(s.get("ticks", 0)) for s in items), sum(int(s.get("rows", 0)) for s in items), buckets)


def lateness_ms(before: LatenessBuckets | None, after: LatenessBuckets | None, q: float) -> float | None:
    """The bucket bound under which a share q of the window's ticks started, in ms."""
    found = None if after is None else after.since(before).quantile(q)
    return None if found is None else found * 1000


def spy_summary(raw: Path, top: int) -> None:
    """py-spy's raw stacks (samples of the trio thread while it is not waiting in epoll), by function."""
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # by function, not by line
        if not count.isdigit() or any("get_events" in f for f in frames[-2:]):
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            within[frame] += int(count)
    print(f"py-spy: {total} busy samples")
    for title, counter in (("self", own), ("on the stack", within)):
        print(f"--- {title}")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / max(1, total):5.1f} {frame[:150]}")


def cpu_ns(pid: int) -> int | None:
    """The process's CPU time in nanoseconds, summed over its live threads (/proc's schedstat: exact, where
    psutil's figure is in 10 ms clock ticks, too coarse for a window of a fraction of a CPU second)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total or None


def one_run(config: Path, state: Path, seconds: float, warm: float, profile: Path | None,
            spy: Path | None = None, rate: int = 250, native: bool = False) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    cmd = [sys.executable]
    if profile is None:
        cmd += ["-m", "reaper.cli", "run", "--config", str(config)]
    else:  # CPU time of the trio thread (not wall time: a loopback send() preempted by the server is not CPU)
        cmd += ["-c", PROFILED_RUN, str(profile), str(config)]
    with open(state / "log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    ps = psutil.Process(proc.pid)
    time.sleep(warm)  # start-up and the first full ticks are not the steady state
    if profile is not None:
        proc.send_signal(signal.SIGRTMIN + 5)
    t0, rows0, late0 = ticks(state, proc.pid)
    c0 = sum(ps.cpu_times()[:2])
    s0 = ps.cpu_times().system
    n0 = cpu_ns(proc.pid)
    w0 = ps.num_ctx_switches().voluntary  # each time the process waited (epoll, a sleep): its wake-ups
    if spy is not None:
        subprocess.run([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(proc.pid), "-r", str(rate),
                        "--gil", *(["--native"] if native else ["--nonblocking"]), "-d", str(int(seconds)),
                        "-f", "raw", "-o", str(spy)],
                       capture_output=True)
    else:
        time.sleep(seconds)
    t1, rows1, late1 = ticks(state, proc.pid)
    c1 = sum(ps.cpu_times()[:2])
    s1 = ps.cpu_times().system
    n1 = cpu_ns(proc.pid)
    w1 = ps.num_ctx_switches().voluntary
    system_share = (s1 - s0) / max(1e-9, c1 - c0)
    if n0 is not None and n1 is not None:
        c0, c1 = 0.0, (n1 - n0) / 1e9
    rss = ps.memory_info().rss
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    n = max(1, t1 - t0)
    return {"ticks": t1 - t0, "rows": rows1 - rows0, "cpu_s": c1 - c0, "ms_per_tick": 1000 * (c1 - c0) / n,
            "us_per_row": 1e6 * (c1 - c0) / max(1, rows1 - rows0),
            "system_share": round(system_share, 3), "wakeups_per_tick": (w1 - w0) / n, "rss_mb": rss / 1e6,
            "lateness_p50_ms": lateness_ms(late0, late1, 0.5), "lateness_p99_ms": lateness_ms(late0, late1, 0.99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--sources", type=int, default=6)
    p.add_argument("--interval", type=int, default=2, help="every metric's interval (0: the preset's own)")
    p.add_argument("--databases", type=int, help="fewer databases than sources (sources share them)")
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--warm", type=float, default=12)
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--spy", action="store_true", help="py-spy the plain run's trio thread (busy samples)")
    p.add_argument("--native", action="store_true", help="py-spy C frames too (asyncpg, orjson, the interpreter)")
    p.add_argument("--rate", type=int, default=250, help="py-spy's samples per second (--spy)")
    p.add_argument("--only", choices=("all", "sql", "special"), default="all", help="which of the preset's metrics")
    p.add_argument("--save", type=Path, help="keep the cProfile output here (for pstats or snakeviz)")
    args = p.parse_args()
    server = lab.start_server(max_connections=4 * args.sources + 20)
    try:
        dbs = lab.database_names(min(args.sources, args.databases or args.sources))
        lab.prepare(server, dbs)
        work = lab.Workload(server, dbs, rate=20)
        work.start()
        with tempfile.TemporaryDirectory(prefix="reaper-prof-") as tmp:
            base = Path(tmp)
            results = {}
            for kind in ("plain",) + (() if args.no_profile else ("cprofile",)):
                state = base / kind
                state.mkdir()
                config = state / "reaper.toml"
                write_config(config, server, dbs, args, state, state / "out.ndjson")
                prof = state / "prof.out" if kind == "cprofile" else None
                spy = state / "spy.txt" if kind == "plain" and args.spy else None
                results[kind] = one_run(config, state, args.seconds, args.warm, prof, spy, args.rate, args.native)
                print(kind, json.dumps({k: round(v, 3) for k, v in results[kind].items()}), flush=True)
                if spy is not None and spy.exists():
                    spy_summary(spy, args.top)
                if prof is not None and prof.exists():
                    if args.save:
                        shutil.copyfile(prof, args.save)
                    stats = pstats.Stats(str(prof))
                    stats.sort_stats("tottime").print_stats(args.top)
                    stats.sort_stats("cumulative").print_stats(args.top)
        work.stop()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
