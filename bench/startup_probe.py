"""A fleet's start-up and tick lateness, quickly: `python bench/startup_probe.py --sources 1000 --seconds 90`.

A lighter lab than `bench/run.py fleet1000` (no workload, no peer, no yardsticks, no one-source run): it starts
its own PostgreSQL 15 with 100 databases, runs a real `reaper run` with N `basic` sources for `--seconds`, and
prints reaper's CPU seconds over its first 8 s and in each 5 s window from its start (issue 14: none over
15 % of a core), and the lateness the status file reports (the worst source's p99 and max, the median p50).
`--py-spy SECONDS` records a profile of the first seconds (`py-spy record --nonblocking`, raw; use --keep);
`--gc-log` makes the run log every garbage collection's generation and duration (a sitecustomize on
PYTHONPATH) and prints them per generation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # the throwaway-server helper (tests/pgserver.py)

import lab  # noqa: E402
import measure  # noqa: E402
from run import Scenario, die_with_parent, read_status, start_reaper, write_config  # noqa: E402

PROFILE_HOOK = """
import cProfile, os, signal, time
_prof = cProfile.Profile(time.process_time)
def _dump(*_):
    _prof.disable()
    _prof.dump_stats(os.environ["REAPER_PROBE_PROFILE"])
signal.signal(signal.SIGALRM, _dump)
signal.setitimer(signal.ITIMER_REAL, float(os.environ["REAPER_PROBE_PROFILE_SECONDS"]))
_prof.enable()
"""

GC_HOOK = '''
import gc, os, time, atexit
_path = os.environ.get("REAPER_PROBE_GC_LOG")
if _path:
    _t, _rec, _t0 = {}, [], time.monotonic()
    def _cb(phase, info):
        if phase == "start":
            _t["s"] = time.perf_counter()
        else:
            _rec.append((time.monotonic() - _t0, info["generation"], (time.perf_counter() - _t["s"]) * 1000))
            if info["generation"] == 2 or len(_rec) % 500 == 0:
                _dump()
    def _dump():
        with open(_path, "w") as f:
            f.writelines("%.2f %d %.3f\\n" % r for r in _rec)
    gc.callbacks.append(_cb)
    atexit.register(_dump)
    _every = float(os.environ.get("REAPER_PROBE_FREEZE", "0"))
    if _every:  # experiment: freeze every few seconds of start-up, then count what a full collection would free
        import threading
        def _freezer():
            while time.monotonic() - _t0 < 70:
                time.sleep(_every)
                gc.freeze()
            time.sleep(5)
            frozen = gc.get_freeze_count()
            gc.unfreeze()
            s = time.perf_counter()
            n = gc.collect()
            with open(_path + ".freeze", "w") as f:
                f.write("frozen %d, then a full collection freed %d in %.0f ms\\n"
                        % (frozen, n, (time.perf_counter() - s) * 1000))
        threading.Thread(target=_freezer, daemon=True).start()
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--preset", default="basic")
    parser.add_argument("--py-spy", type=float, default=0.0, help="profile the first SECONDS (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory under /var/tmp")
    parser.add_argument("--gc-log", action="store_true")
    parser.add_argument("--cprofile", type=float, default=0.0,
                        help="cProfile the first SECONDS of the process, imports included (CPU time; kept in "
                             "the run directory as startup.prof; use --keep)")
    parser.add_argument("--freeze-every", type=float, default=0.0, help="experiment (with --gc-log): gc.freeze() "
                        "every SECONDS of the first 70 s, then count what a full collection frees")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_dir = Path(tempfile.mkdtemp(prefix="reaper-probe-", dir="/var/tmp"))
    sc = Scenario(name="probe", title="probe", sources=args.sources, preset=args.preset, databases=100)
    server = reaper = None
    sampler = measure.Sampler(period=0.5)
    env: dict[str, str] = {}
    if args.gc_log:
        site = run_dir / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(GC_HOOK)
        env = {"PYTHONPATH": str(site), "REAPER_PROBE_GC_LOG": str(run_dir / "gc.log"),
               "REAPER_PROBE_FREEZE": str(args.freeze_every)}
    if args.cprofile:
        site = run_dir / "site"
        site.mkdir(exist_ok=True)
        hook = (site / "sitecustomize.py").read_text() if (site / "sitecustomize.py").exists() else ""
        (site / "sitecustomize.py").write_text(hook + PROFILE_HOOK)
        env.update({"PYTHONPATH": str(site), "REAPER_PROBE_PROFILE": str(run_dir / "startup.prof"),
                    "REAPER_PROBE_PROFILE_SECONDS": str(args.cprofile)})
    try:
        server = lab.start_server(args.sources + 150)
        lab.prepare(server, lab.database_names(sc.databases))
        state = run_dir / "state"
        write_config(run_dir / "reaper.toml", sc, server, state, run_dir / "out.ndjson")
        sampler.start()
        reaper = start_reaper(run_dir / "reaper.toml", run_dir / "reaper.log", env)
        sampler.add("reaper", reaper.pid)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(reaper.pid),
                                    "--nonblocking", "--gil", "--rate", "500",
                                    "--duration", str(max(1, round(args.py_spy))), "--format", "raw",
                                    "-o", str(run_dir / "spy.txt")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        while sampler.now() < args.seconds:
            time.sleep(1.0)
            if reaper.poll() is not None:
                raise RuntimeError(f"reaper exited: {reaper.returncode}")
        reaper.send_signal(signal.SIGUSR2)
        t0 = time.monotonic()
        st = None
        while time.monotonic() - t0 < 20:
            time.sleep(1.0)
            st = read_status(state)
            if st is not None and st.get("updated_wall", 0) > time.time() - 3:
                break
        if spy is not None:
            spy.wait(timeout=60)
            print(f"py-spy: {run_dir / 'spy.txt'} (kept with --keep)")
        windows = measure.startup_windows(sampler.samples["reaper"], 0.0, args.seconds, 5.0)
        early = [s for s in sampler.samples["reaper"] if s["t"] <= 8.0]
        print("cpu s by t (first 8 s):", " ".join(f"{s['t']:.1f}:{s['cpu']:.2f}" for s in early))
        late = [x["rss"] for x in sampler.samples["reaper"] if x["t"] >= args.seconds - 10]
        if late:
            print(f"rss over the last 10 s (median): {statistics.median(late) / 2**20:.1f} MiB")
        print("cpu % per 5 s:", " ".join(f"{w:.0f}" for w in windows))
        print(f"peak 5 s window: {max(windows):.1f} %   mean over {args.seconds:.0f} s: "
              f"{statistics.mean(windows):.1f} %")
        if st is not None:
            srcs = st["sources"]
            up = sum(1 for s in srcs if s["status"] == "up" and s["ticks"] >= 1)
            p99 = sorted(s["lateness_p99"] for s in srcs)
            mx = sorted(s["lateness_max"] for s in srcs)
            print(f"sources up with a tick: {up}/{args.sources}; lateness ms: median p50 "
                  f"{1000 * statistics.median(s['lateness_p50'] for s in srcs):.1f}, worst p99 {1000 * p99[-1]:.0f}, "
                  f"p99 of the sources' p99 {1000 * p99[int(0.99 * (len(p99) - 1))]:.0f}, "
                  f"worst max {1000 * mx[-1]:.0f}")
        if args.gc_log and (run_dir / "gc.log").exists():
            rows = [line.split() for line in (run_dir / "gc.log").read_text().splitlines()]
            for gen in (0, 1, 2):
                d = [float(r[2]) for r in rows if r[1] == str(gen)]
                if d:
                    print(f"gc gen{gen}: {len(d)} collections, total {sum(d):.0f} ms, max {max(d):.1f} ms")
        if (run_dir / "gc.log.freeze").exists():
            print((run_dir / "gc.log.freeze").read_text().strip())
        if args.cprofile and (run_dir / "startup.prof").exists():
            print(f"cProfile of the first {args.cprofile:g} s: {run_dir / 'startup.prof'}")
        if args.keep:
            print(f"run dir: {run_dir}")
        print(json.dumps({"windows": [round(w, 1) for w in windows]}))
    finally:
        sampler.stop()
        if reaper is not None and reaper.poll() is None:
            reaper.send_signal(signal.SIGTERM)
            try:
                reaper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                reaper.kill()
        if server is not None:
            server.cleanup()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("PGSSLMODE", None)
    sys.exit(main())
