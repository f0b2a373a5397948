"""What one run of the special metrics costs reaper: statements, worker-thread hops, threads started,
subprocesses spawned, CPU (reaper's and its children's), averaged over RUNS runs after a first one.

Runs the handlers directly (no daemon) on a throwaway PostgreSQL 15 with csvlog, over a unix socket:
the six OS metrics, server_log_event_counts, smart_health_per_disk and backup_age_pgbackrest (not
configured here: pgBackRest lists no stanza). To compare two builds, run it with PYTHONPATH pointing at
each one's tree (e.g. `git archive <commit> reaper | tar -x -C /tmp/x`):

    PYTHONPATH=/tmp/x .venv/bin/python bench/special_cost.py 20
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

from pgserver import PgServer

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import SourceConfig
from reaper.special import SpecialContext, special_spec

NAMES = ("cpu_load", "psutil_cpu", "psutil_mem", "psutil_disk", "psutil_disk_io_total", "vmstat",
         "server_log_event_counts", "smart_health_per_disk", "backup_age_pgbackrest")
counts = {"to_thread": 0, "threads_started": 0, "spawns": 0}


def _count_calls() -> None:
    real_start = threading.Thread.start
    real_sync = trio.to_thread.run_sync
    real_process = trio.run_process

    def start(self: threading.Thread) -> None:
        counts["threads_started"] += 1
        real_start(self)

    async def to_thread(*args: Any, **kwargs: Any) -> Any:
        counts["to_thread"] += 1
        return await real_sync(*args, **kwargs)

    async def run_process(*args: Any, **kwargs: Any) -> Any:
        counts["spawns"] += 1
        return await real_process(*args, **kwargs)

    threading.Thread.start = start  # type: ignore[method-assign]
    trio.to_thread.run_sync = to_thread
    trio.run_process = run_process


async def measure(server: PgServer, runs: int) -> dict[str, float]:
    catalog = Catalog.for_config()
    dsn = server.dsn()
    config = SourceConfig(name="m", dsn=dsn)
    states: dict[str, dict[str, Any]] = {}
    async with db.open_loop():
        conn = await db.open_source_connection(dsn, statement_timeout_seconds=30)
        try:
            for run in range(runs + 1):
                if run == 1:  # the first run is set-up: facts read, first samples, baselines
                    base, statements = dict(counts), conn.statements
                    cpu, children = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
                for name in NAMES:
                    spec = special_spec(name)
                    assert spec is not None
                    ctx = SpecialContext(source=config, server=conn.server, conn=conn, metric=catalog.metrics[name],
                                         wall_ns=time.time_ns(), state=states.setdefault(name, {}))
                    try:
                        await spec.handler(ctx)
                    except Exception as e:  # unavailable here (no stanza, ...): it still costs what it costs
                        if run == 1:
                            print(f"{name}: {type(e).__name__}: {str(e)[:120]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            per = {k: (counts[k] - base[k]) / runs for k in counts}
            per["statements"] = (conn.statements - statements) / runs
            per["cpu_ms"] = 1000 * (time.process_time() - cpu) / runs
            per["children_cpu_ms"] = 1000 * (after.ru_utime + after.ru_stime
                                             - children.ru_utime - children.ru_stime) / runs
            return per
        finally:
            await conn.close()


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    _count_calls()
    with PgServer.create(settings={"logging_collector": "on", "log_destination": "csvlog"}) as server:
        per = trio.run(measure, server, runs)
    print(f"per run of the {len(NAMES)} specials (mean of {runs}):", {k: round(v, 2) for k, v in per.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
