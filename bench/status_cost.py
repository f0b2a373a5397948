"""What building and writing the status file costs the trio loop at fleet size (issue 14): in process,
no server.

    python bench/status_cost.py [--sources 1000] [--preset basic] [--repeat 5]

Builds a `Daemon` for N sources (none of them connects), gives each source the state a running one
has (a full lateness history, a cost record per metric of the preset, two lanes), then times, on the
trio loop: the change check (`status_fingerprint`), `Daemon.status()` and the one-piece write of
before (status() + write_status_file, all on the loop), and the status writer's write (its wall time,
and the longest single step it kept the loop busy: what a tick due meanwhile waits at most).
Prints milliseconds (best of --repeat) and the file's size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reaper.config.load import load_config  # noqa: E402
from reaper.daemon.app import Daemon  # noqa: E402
from reaper.daemon.lanes import LaneState  # noqa: E402
from reaper.daemon.reconciler import RunningSource  # noqa: E402


class FakeLane:
    def __init__(self, name: str) -> None:
        self.state = LaneState(name=name, connected=True, runs=40, statements_last_run=1, statements_total=40)


def populate(daemon: Daemon, sources: int) -> None:
    now = trio.current_time()
    for config in daemon.source_configs:
        reaper = daemon._make_source(config, daemon.catalog)
        st = reaper.state
        st.status, st.ticks, st.measurements, st.rows = "up", 120, 900, 30000
        st.server_version, st.in_recovery, st.last_tick_wall, st.next_tick = "15.4", False, time.time(), now + 30
        for i in range(1000):
            st.lateness.append((i % 97) / 1000)
        intervals = reaper.active_intervals()
        reaper.cost.effective(intervals)
        for metric in intervals:
            for k in range(3):
                reaper.cost.record(metric, now - 10 * k, 0.002, [{"a": 1, "b": "x"}] * 5)
        reaper.slow, reaper.local = FakeLane("slow"), FakeLane("local")  # type: ignore[assignment]
        daemon.reconciler.sources[config.name] = RunningSource(config, daemon.catalog, reaper, trio.CancelScope(),
                                                               trio.Event())


def best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


class LongestStep(trio.abc.Instrument):
    """The longest a single task step ran (the loop ran nothing else meanwhile)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._t0 = time.perf_counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._t0 = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.longest = max(self.longest, time.perf_counter() - self._t0)


async def main(args: argparse.Namespace) -> None:
    from reaper.daemon import status as status_mod
    from reaper.daemon import statuswrite

    with tempfile.TemporaryDirectory(prefix="reaper-status-") as tmp:
        config = Path(tmp) / "reaper.toml"
        lines = ["[collector]", f'state_dir = "{tmp}/state"', "",
                 "[[sinks]]", 'type = "jsonfile"', f'path = "{tmp}/out.ndjson"', ""]
        for i in range(args.sources):
            lines += ["[[sources]]", f'name = "s{i:04d}"', f'dsn = "postgresql://reaper@127.0.0.1:1/db{i}"',
                      f'preset = "{args.preset}"', ""]
        config.write_text("\n".join(lines))
        daemon = Daemon(load_config(config))
        populate(daemon, args.sources)
        path = daemon.state_dir / status_mod.STATUS_FILE
        results = {
            "fingerprint": best(lambda: statuswrite.status_fingerprint(daemon), args.repeat),
            "status() in one piece": best(daemon.status, args.repeat),
            "one-piece status + write (as before)":
                best(lambda: status_mod.write_status_file(path, daemon.status()), args.repeat),
        }
        writer = daemon.status_writer
        longest, whole = [], []
        for _ in range(args.repeat):
            probe = LongestStep()
            trio.lowlevel.add_instrument(probe)
            t0 = time.perf_counter()
            await writer.write()
            whole.append(time.perf_counter() - t0)
            trio.lowlevel.remove_instrument(probe)
            longest.append(probe.longest)
        results["StatusWriter.write(), wall"] = 1000 * min(whole)
        results["  its longest loop step"] = 1000 * min(longest)
        for name, ms in results.items():
            print(f"{name:40s} {ms:8.2f} ms")
        print(f"{'file':40s} {path.stat().st_size / 1e6:8.2f} MB for {args.sources} sources")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=int, default=1000)
    p.add_argument("--preset", default="basic")
    p.add_argument("--repeat", type=int, default=5)
    trio.run(main, p.parse_args())
