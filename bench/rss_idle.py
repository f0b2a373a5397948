"""RSS of an idle `reaper run` with one source and a jsonfile sink (a quick before/after probe).

    python bench/rss_idle.py [--preset basic] [--seconds 20] [--tree DIR ...]

Starts a throwaway PostgreSQL 15 (bench/lab.py), then for each tree (default: this checkout; another
one e.g. from `git archive <rev> reaper | tar -x -C DIR`) runs `reaper run` from it for `--seconds`
and prints VmRSS and VmHWM at the end, and how many modules it had imported (from -X importtime).
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

from lab import start_server  # noqa: E402


def status_of(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def one_run(tree: Path, dsn: str, preset: str, seconds: float) -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="reaper-rss-") as tmp:
        config = Path(tmp) / "reaper.toml"
        config.write_text(f'[collector]\nstate_dir = "{tmp}/state"\n\n[[sinks]]\ntype = "jsonfile"\n'
                          f'path = "{tmp}/out.ndjson"\n\n[[sources]]\nname = "one"\ndsn = "{dsn}"\n'
                          f'preset = "{preset}"\n')
        env = {**os.environ, "PYTHONPATH": str(tree)}
        err = Path(tmp) / "stderr"
        with err.open("wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "reaper.cli", "run", "--config",
                                     str(config)], env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            time.sleep(seconds)
            if proc.poll() is not None:
                raise SystemExit(f"reaper exited: {err.read_text()[-1500:]}")
            figures = status_of(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        figures["modules"] = sum(1 for line in err.read_text().splitlines() if line.startswith("import time:")) - 1
        return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="basic")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tree", action="append", type=Path, help="a directory holding the reaper package")
    args = ap.parse_args()
    server = start_server(20)
    try:
        server.psql("create extension if not exists pg_stat_statements")
        for tree in args.tree or [ROOT]:
            f = one_run(tree, server.dsn(), args.preset, args.seconds)
            print(f"{tree}: VmRSS {f['VmRSS'] / 1e6:.1f} MB, VmHWM {f['VmHWM'] / 1e6:.1f} MB, "
                  f"{f['modules']} modules imported")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
