"""RSS of an idle `reaper run` on one throwaway server (a quick before/after probe), and the marginal
memory of one more source.

    python bench/rss_idle.py [--preset basic] [--seconds 20] [--sources N] [--tree DIR ...]
    python bench/rss_idle.py --marginal 50            # 1 source, then 50: MB per extra source
    python bench/rss_idle.py --preset debug --sources 6 --interval 2 --alloc   # + MB allocated per minute

Starts a throwaway PostgreSQL 15 (bench/lab.py), then for each tree (default: this checkout; another
one e.g. from `git archive <rev> reaper | tar -x -C DIR`) runs `reaper run` from it for `--seconds`
with N sources (all on the server's `postgres` database) and a jsonfile sink, and prints VmRSS and
VmHWM at the end, and how many modules it had imported (from -X importtime). `--interval` re-times
every metric of the preset (so a short run holds many ticks). `--alloc` runs it under the
allocation-counting shim (bench/allocshim.c, PYTHONMALLOC=malloc: every byte asked of malloc) and
prints the bytes allocated per minute over the second half of the run (the first half is start-up).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

import measure  # noqa: E402
from lab import start_server  # noqa: E402


def status_of(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


def smaps_summary(pid: int, top: int = 12) -> str:
    """The process's resident memory by mapping: the heap, glibc's thread arenas, the stacks, each shared
    object (summed over its segments), largest first."""
    rss: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else "[anon]"
            name = name.rsplit("/", 1)[-1]
        elif head[0] == "Rss:":
            rss[name] = rss.get(name, 0) + int(head[1]) * 1024
    lines = [f"  {kb / 1e6:6.2f} MB  {what}" for what, kb in sorted(rss.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


def write_config(path: Path, tmp: str, dsn: str, preset: str, sources: int, interval: int | None) -> None:
    lines = ["[collector]", f'state_dir = "{tmp}/state"', "", "[[sinks]]", 'type = "jsonfile"',
             f'path = "{tmp}/out.ndjson"', ""]
    if interval:
        sys.path.insert(0, str(ROOT))
        from reaper.catalog.metrics import load_shipped_definitions

        metrics = load_shipped_definitions().presets[preset].metrics
        timed = ", ".join(f"{name} = {interval}" for name in sorted(metrics))
        lines += ["[presets.timed]", f"metrics = {{ {timed} }}", ""]
        preset = "timed"
    for i in range(sources):
        lines += ["[[sources]]", f'name = "s{i + 1:04d}"', f'dsn = "{dsn}"', f'preset = "{preset}"', ""]
    path.write_text("\n".join(lines))


def one_run(tree: Path, dsn: str, preset: str, seconds: float, *, sources: int = 1, interval: int | None = None,
            alloc: bool = False, smaps: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="reaper-rss-") as tmp:
        config = Path(tmp) / "reaper.toml"
        write_config(config, tmp, dsn, preset, sources, interval)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        shim = measure.build_alloc_shim(Path(tmp)) if alloc else None
        counts = Path(tmp) / "alloc.txt"
        if shim is not None:
            env.update(LD_PRELOAD=str(shim), PYTHONMALLOC="malloc", ALLOCSHIM_OUT=str(counts))
        err = Path(tmp) / "stderr"
        with err.open("wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "reaper.cli", "run", "--config",
                                     str(config)], env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=stderr)
        figures: dict[str, float] = {}
        try:
            time.sleep(seconds / 2)
            marks = [time.monotonic()]
            if shim is not None:
                proc.send_signal(measure.ALLOC_SIGNAL)
            time.sleep(seconds / 2)
            if proc.poll() is not None:
                raise SystemExit(f"reaper exited: {err.read_text()[-1500:]}")
            marks.append(time.monotonic())
            if shim is not None:
                proc.send_signal(measure.ALLOC_SIGNAL)
                time.sleep(0.3)
            figures.update(status_of(proc.pid))
            if smaps:
                print(smaps_summary(proc.pid), flush=True)
                if os.environ.get("RSS_HOOK"):
                    subprocess.run([sys.executable, os.environ["RSS_HOOK"], str(proc.pid)])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        figures["modules"] = sum(1 for line in err.read_text().splitlines() if line.startswith("import time:")) - 1
        dumps = measure.read_alloc(counts, proc.pid) if shim is not None else []
        if len(dumps) >= 2:
            minutes = (marks[1] - marks[0]) / 60
            figures["alloc_mb_per_min"] = (dumps[1][0] - dumps[0][0]) / 1e6 / minutes
            figures["allocs_per_min"] = (dumps[1][1] - dumps[0][1]) / minutes
        return figures


def describe(f: dict[str, float]) -> str:
    text = (f"VmRSS {f['VmRSS'] / 1e6:.1f} MB (anon {f.get('RssAnon', 0) / 1e6:.1f}), "
            f"VmHWM {f['VmHWM'] / 1e6:.1f} MB, {f['modules']:.0f} modules imported")
    if "alloc_mb_per_min" in f:
        text += f", allocated {f['alloc_mb_per_min']:.1f} MB/min in {f['allocs_per_min'] / 1e3:.0f}k calls"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="basic")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--sources", type=int, default=1)
    ap.add_argument("--marginal", type=int, metavar="N",
                    help="also run with N sources and print the RSS each source beyond the first adds")
    ap.add_argument("--interval", type=int, help="re-time every metric of the preset to this many seconds")
    ap.add_argument("--alloc", action="store_true", help="count allocations (needs a C compiler)")
    ap.add_argument("--smaps", action="store_true", help="print where the resident memory lies, by mapping")
    ap.add_argument("--tree", action="append", type=Path, help="a directory holding the reaper package")
    args = ap.parse_args()
    server = start_server(2 * max(args.sources, args.marginal or 0) + 20)
    try:
        server.psql("create extension if not exists pg_stat_statements")
        for tree in args.tree or [ROOT]:
            kw = {"interval": args.interval, "alloc": args.alloc, "smaps": args.smaps}
            f = one_run(tree, server.dsn(), args.preset, args.seconds, sources=args.sources, **kw)
            print(f"{tree}: {args.sources} x {args.preset}: {describe(f)}", flush=True)
            if args.marginal:
                g = one_run(tree, server.dsn(), args.preset, args.seconds, sources=args.marginal, **kw)
                per = (g["VmRSS"] - f["VmRSS"]) / max(1, args.marginal - args.sources)
                print(f"{tree}: {args.marginal} x {args.preset}: {describe(g)}; "
                      f"{per / 1e3:.0f} KB RSS per extra source", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
