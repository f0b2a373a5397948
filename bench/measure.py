"""Measuring processes from outside: a 1 s sampler (psutil), peak RSS, the allocation-counting shim."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ALLOC_SIGNAL = signal.SIGRTMIN + 4  # bench/allocshim.c dumps its counters on it

log = logging.getLogger("bench.measure")

HERE = Path(__file__).resolve().parent


def thread_runtimes(pid: int) -> dict[int, int]:
    """Each live thread's CPU time in ns: the scheduler's own count (/proc/PID/task/TID/schedstat, first
    field), exact, where utime+stime come in 10 ms clock ticks (a peer's 0.1 s of CPU is then +-10-20 %)."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return out


class ExactCpu:
    """A process's CPU seconds from its threads' exact run times, summed over every thread seen: one that
    ends keeps the count last read of it (what it ran after that read, at most one sampling period of a
    thread that was ending, is not counted)."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}
        self.ended_ns = 0

    def read(self, pid: int) -> float | None:
        now = thread_runtimes(pid)
        if not now:
            return None
        self.ended_ns += sum(ns for tid, ns in self.last.items() if tid not in now)
        self.last = now
        return (self.ended_ns + sum(now.values())) / 1e9


class Sampler:
    """Every `period` seconds: RSS, CPU seconds (utime+stime; and `cpu_exact`, from the threads' exact run
    times, see ExactCpu) and threads of each named process."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self.procs: dict[str, psutil.Process] = {}
        self.samples: dict[str, list[dict[str, float]]] = {}
        self._exact: dict[str, ExactCpu] = {}
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._lock = threading.Lock()

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.procs[name] = psutil.Process(pid)
            self.samples.setdefault(name, [])
            self._exact[name] = ExactCpu()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sample_once(self) -> None:
        t = self.now()
        with self._lock:
            items = list(self.procs.items())
        for name, proc in items:
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    rss = proc.memory_info().rss
                    threads = proc.num_threads()
            except psutil.Error:
                continue
            sample = {"t": t, "rss": float(rss), "cpu": cpu.user + cpu.system, "threads": float(threads)}
            exact = self._exact[name].read(proc.pid)
            if exact is not None:
                sample["cpu_exact"] = exact
            self.samples[name].append(sample)

    def _loop(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            nxt += self.period
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def peak_rss(pid: int) -> int | None:
    """VmHWM: the kernel's own peak resident set (catches peaks between samples)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def at_sample(samples: list[dict[str, float]], t: float) -> dict[str, float]:
    """The last sample taken at or before t (the first sample when none)."""
    best = samples[0]
    for s in samples:
        if s["t"] <= t:
            best = s
        else:
            break
    return best


def at(samples: list[dict[str, float]], t: float, key: str) -> float:
    """The value of the last sample taken at or before t (the first sample when none)."""
    return at_sample(samples, t)[key]


def cpu_between(samples: list[dict[str, float]], t_from: float, t_to: float) -> float:
    """CPU seconds between two times: from the exact run times when both samples have them (bench data
    from before they were taken has only utime+stime)."""
    a, b = at_sample(samples, t_from), at_sample(samples, t_to)
    key = "cpu_exact" if "cpu_exact" in a and "cpu_exact" in b else "cpu"
    return b[key] - a[key]


def window(samples: list[dict[str, float]], t_from: float, t_to: float) -> list[dict[str, float]]:
    return [s for s in samples if t_from <= s["t"] <= t_to]


def cpu_percent_series(samples: list[dict[str, float]], smooth: float = 5.0) -> list[tuple[float, float]]:
    """(t, % of one core) over a trailing window of `smooth` seconds."""
    out = []
    j = 0
    for i, s in enumerate(samples):
        while samples[j]["t"] < s["t"] - smooth and j < i:
            j += 1
        if i > j:
            dt = s["t"] - samples[j]["t"]
            out.append((s["t"], 100.0 * (s["cpu"] - samples[j]["cpu"]) / dt if dt > 0 else 0.0))
    return out


def process_cpu(pids: list[int]) -> float:
    """Summed utime+stime of processes (e.g. server backends); vanished ones count 0."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# -- allocation counting ------------------------------------------------------------------------

def build_alloc_shim(workdir: Path) -> Path | None:
    """Compile bench/allocshim.c (needs a C compiler); None when that is not possible."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = workdir / "allocshim.so"
    proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(HERE / "allocshim.c")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("allocation shim did not build: %s", proc.stderr.strip()[:300])
        return None
    return out


def read_alloc(path: Path, pid: int) -> list[tuple[int, int, int]]:
    """The shim's dumps so far by process `pid`: (bytes, calls, realloc_full) each."""
    try:
        lines = path.read_text().split("\n")
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and int(parts[0]) == pid:
            out.append((int(parts[1]), int(parts[2]), int(parts[3])))
    return out


def summarize_samples(samples: list[dict[str, float]]) -> dict[str, Any]:
    if not samples:
        return {}
    return {"rss_max": max(s["rss"] for s in samples), "cpu_end": samples[-1]["cpu"], "n": len(samples)}


def cpu_interp(samples: list[dict[str, float]], t: float) -> float:
    """CPU seconds at t, interpolated linearly between the samples around it."""
    prev = samples[0]
    if t <= prev["t"]:
        return prev["cpu"]
    for s in samples[1:]:
        if s["t"] >= t:
            span = s["t"] - prev["t"]
            return prev["cpu"] + (s["cpu"] - prev["cpu"]) * ((t - prev["t"]) / span if span > 0 else 1.0)
        prev = s
    return prev["cpu"]


def startup_windows(samples: list[dict[str, float]], t_start: float, length: float = 60.0,
                    step: float = 5.0) -> list[float]:
    """CPU % of one core in consecutive `step`-second windows over the first `length` seconds after
    t_start (when the process was started: it had used no CPU then). Windows past the samples are left out."""
    if not samples:
        return []
    points = [{"t": t_start, "cpu": 0.0}, *(s for s in samples if s["t"] > t_start)]
    out = []
    k = 0
    while (k + 1) * step <= length + 1e-9 and t_start + (k + 1) * step <= points[-1]["t"] + 0.5:
        a, b = t_start + k * step, t_start + (k + 1) * step
        out.append(100.0 * (cpu_interp(points, b) - cpu_interp(points, a)) / step)
        k += 1
    return out


def handles_signal(pid: int, signum: int) -> bool:
    """Whether the process catches signal `signum` (/proc/PID/status SigCgt), i.e. sending it is safe."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        return False
    return False


def window_lateness(st0: dict[str, Any], st1: dict[str, Any]) -> dict[str, float | int | None]:
    """Every source's ticks between two status documents, pooled (reaper.daemon.status.LatenessBuckets):
    their count and the p50 / p99 bucket bounds in ms (None when the daemon does not report the histogram)."""
    from reaper.daemon.status import LatenessBuckets  # the bench's own checkout

    def buckets(doc: dict[str, Any]) -> LatenessBuckets | None:
        h = doc.get("tick_lateness")
        return None if not h else LatenessBuckets(le=tuple(h["le"]), counts=tuple(h["counts"]), sum=h["sum"])

    end = buckets(st1)
    if end is None:
        return {"ticks": None, "p50_ms": None, "p99_ms": None}
    window = end.since(buckets(st0))
    q50, q99 = window.quantile(0.5), window.quantile(0.99)
    return {"ticks": window.total, "p50_ms": None if q50 is None else 1000 * q50,
            "p99_ms": None if q99 is None else 1000 * q99}
