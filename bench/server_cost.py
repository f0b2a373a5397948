"""What reaper costs each monitored server, per preset (issue 15 item 4): `just bench server-cost`.

Starts a throwaway PostgreSQL 15 (tests/pgserver.py; pg_stat_statements preloaded, track_functions = pl,
track_io_timing = on), gives it a small realistic workload (`pgbench -i -s 5`, a few more tables, a view,
plpgsql functions, then `pgbench` in the background at a low rate: tpcb-like transactions plus calls of
the functions), and runs a real `reaper run` process for each preset (`basic`, `standard`,
`exhaustive`): one source, monitoring role with only pg_monitor + CONNECT, jsonfile sink.

The presets' intervals run up to 7200 s, so each run uses a config overlay that scales every interval
down: interval // 10, at least 6 s and at most 60 s. Every metric thus runs at least twice (three times)
in the default 150 s. reaper's own cost (its status file) gives per metric the mean server time, rows and
bytes of its recent runs; the figures are projected back to the preset's own intervals (per run x runs
per minute at the real interval): that is the headline figure. pg_stat_statements (reaper's role, its
database) is read over the same run as a cross-check of the scaled run's total: it also holds what lies
outside the bracketed subqueries (the statement around them, the read-only guard, the cost's own view).

    .venv/bin/python bench/server_cost.py [--duration 150] [--presets basic,standard,exhaustive]
        [--no-report] [--keep] [--from-json FILE]

Writes the section "Server cost per source" at the end of docs/benchmarks.md and the table in README's
"Deploying on production servers" section. Everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway-server helper (tests/pgserver.py)

from pgserver import PgServer, cleanup_stale, create_monitoring_role  # noqa: E402

log = logging.getLogger("bench.server_cost")
RUN_ROOT = Path(os.environ.get("REAPER_BENCH_ROOT", "/var/tmp/reaper-bench"))
PRESETS = ("basic", "standard", "exhaustive")
ROLE = "reaper_mon"  # pg_monitor + CONNECT, nothing else
DB = "app"
SCALE_DIV, SCALE_MIN, SCALE_MAX = 10, 6, 60
WARM_S = 30.0  # pg_stat_statements' window starts this long after the first tick (connection set-up left out)
SECTION = "## Server cost per source"
DATA_RE = re.compile(r"<!-- server-cost-data (\{.*?\}) -->", re.S)
README_START = "**What reaper costs each server.**"
README_END = "## How it works"

# A few more tables, a view and plpgsql functions beside pgbench's, so that table, index, sequence and
# function statistics have rows (own SQL).
APP_SQL = """
create schema shop;
create table shop.customers (id bigserial primary key, name text not null, created timestamptz not null default now());
create table shop.orders (id bigserial primary key, customer_id bigint not null references shop.customers,
                          amount numeric(12, 2) not null, created timestamptz not null default now());
create index orders_customer on shop.orders (customer_id);
create index orders_created on shop.orders (created);
create table shop.events (id bigint generated always as identity primary key, kind text not null,
                          payload jsonb, at timestamptz not null default now());
insert into shop.customers (name) select 'customer ' || g from generate_series(1, 5000) g;
insert into shop.orders (customer_id, amount) select 1 + g % 5000, (g % 997) / 10.0 from generate_series(1, 50000) g;
create function shop.place_order(c bigint, amt numeric) returns bigint language plpgsql as $f$
declare
    new_id bigint;
begin
    insert into shop.orders (customer_id, amount) values (c, amt) returning id into new_id;
    insert into shop.events (kind, payload) values ('order', jsonb_build_object('id', new_id, 'amount', amt));
    return new_id;
end $f$;
create function shop.customer_total(c bigint) returns numeric language plpgsql stable as $f$
begin
    return (select coalesce(sum(amount), 0) from shop.orders where customer_id = c);
end $f$;
create view shop.daily as select date_trunc('day', created) as day, count(*) as orders, sum(amount) as amount
    from shop.orders group by 1;
analyze;
"""

SHOP_SCRIPT = """\\set c random(1, 5000)
\\set amt random(1, 500)
select shop.place_order(:c, :amt);
select shop.customer_total(:c);
select * from shop.daily order by day desc limit 3;
"""


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the harness dies, however it dies (Linux)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


# -- the server and its workload ---------------------------------------------------------------

def start_server() -> PgServer:
    return PgServer.create(major=15, settings={
        "max_connections": "50",
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track": "top",
        "track_functions": "pl",
        "track_io_timing": "on",
        "autovacuum_naptime": "20s",
        "log_min_messages": "warning",
    })


def prepare(server: PgServer, run_dir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    server.psql(f"create database {DB}")
    subprocess.run([str(server.bindir / "pgbench"), "-i", "-s", "5", "-q", "-h", server.host, "-p",
                    str(server.port), "-U", "postgres", DB], check=True, capture_output=True, env=client_env())
    server.psql("create extension if not exists pg_stat_statements;\n" + APP_SQL, dbname=DB)
    create_monitoring_role(server, ROLE)
    server.psql(f"grant connect on database {DB} to {ROLE}")
    (run_dir / "shop.sql").write_text(SHOP_SCRIPT)
    facts = json.loads(server.psql(
        "select json_build_object('size', pg_size_pretty(pg_database_size(current_database())),"
        " 'tables', (select count(*) from pg_stat_user_tables), 'indexes', (select count(*) from pg_stat_user_indexes),"
        " 'functions', (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        "               where n.nspname = 'shop'))", dbname=DB))
    log.info("prepared database %s (%s) in %.1fs", DB, facts["size"], time.monotonic() - t0)
    return dict(facts)


def start_workload(server: PgServer, run_dir: Path, rate: float) -> subprocess.Popen[bytes]:
    """pgbench at a low rate for as long as the bench runs: tpcb-like transactions and the shop's functions."""
    cmd = [str(server.bindir / "pgbench"), "-n", "-h", server.host, "-p", str(server.port), "-U", "postgres",
           "-c", "2", "-j", "1", "-R", str(rate), "-T", "36000", "-b", "tpcb-like@3",
           "-f", f"{run_dir / 'shop.sql'}@1", DB]
    with open(run_dir / "pgbench.log", "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=client_env(), preexec_fn=die_with_parent)


def statements(server: PgServer) -> dict[str, float]:
    """pg_stat_statements of reaper's role in the database: total execution time, calls, rows."""
    out = server.psql(f"""
        select json_build_object('exec_ms', coalesce(sum(total_exec_time), 0), 'calls', coalesce(sum(calls), 0),
                                 'rows', coalesce(sum(s.rows), 0))
        from pg_stat_statements s
        where userid = (select oid from pg_roles where rolname = '{ROLE}')
          and dbid = (select oid from pg_database where datname = '{DB}')""", dbname=DB)
    return {k: float(v) for k, v in json.loads(out).items()}


# -- one preset --------------------------------------------------------------------------------

def preset_intervals(preset: str) -> dict[str, int]:
    from reaper.catalog.metrics import Catalog
    from reaper.config.schema import SourceConfig

    source = SourceConfig(name="x", dsn="postgresql://x@127.0.0.1/x", preset=preset)
    return dict(Catalog.for_config(None).intervals(source, standby=False))


def scaled(interval: int) -> int:
    return max(SCALE_MIN, min(SCALE_MAX, interval // SCALE_DIV))


def write_config(path: Path, preset: str, server: PgServer, state_dir: Path, output: Path,
                 intervals: dict[str, int]) -> None:
    overlay = ", ".join(f"{m} = {scaled(i)}" for m, i in sorted(intervals.items()))
    path.write_text("\n".join([
        "# written by bench/server_cost.py: the preset's intervals scaled down (interval // 10, 6..60 s)",
        "[collector]", f'state_dir = "{state_dir}"', "cost_window_seconds = 60", "",
        "[[sources]]", f'name = "{preset}"', f'dsn = "{server.dsn(user=ROLE, dbname=DB)}"', f'preset = "{preset}"',
        f"metrics = {{ {overlay} }}", "",
        "[[sinks]]", 'type = "jsonfile"', f'path = "{output}"', ""]))


def read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = json.loads((state_dir / "status.json").read_bytes())
        return result
    except (OSError, ValueError):
        return None


def fresh_status(state_dir: Path, after: float, limit: float = 15.0) -> dict[str, Any] | None:
    """The status file once reaper has rewritten it after the wall time `after`."""
    deadline = time.monotonic() + limit
    st = read_status(state_dir)
    while time.monotonic() < deadline:
        st = read_status(state_dir)
        if st is not None and st.get("updated_wall", 0) > after:
            return st
        time.sleep(0.2)
    return st


def runs_per_metric(output: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in output.read_text().splitlines():
            with contextlib.suppress(ValueError):
                metric = json.loads(line).get("metric", "?")
                counts[metric] = counts.get(metric, 0) + 1
    return counts


def run_preset(preset: str, server: PgServer, run_dir: Path, duration: float) -> dict[str, Any]:
    intervals = preset_intervals(preset)
    pdir = run_dir / preset
    pdir.mkdir()
    state_dir, output, config = pdir / "state", pdir / "measurements.ndjson", pdir / "reaper.toml"
    write_config(config, preset, server, state_dir, output, intervals)
    server.psql("select pg_stat_statements_reset()", dbname=DB)
    logfile = pdir / "reaper.log"
    with open(logfile, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "reaper.cli", "run", "--config", str(config)], stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=client_env(), cwd=ROOT,
                                preexec_fn=die_with_parent)
    try:
        t_start = time.monotonic()
        t_up = None
        while t_up is None:
            if proc.poll() is not None:
                raise RuntimeError(f"reaper exited with {proc.returncode}: see {logfile}")
            if time.monotonic() - t_start > 120:
                raise RuntimeError(f"{preset}: the source did not come up within 120 s: see {logfile}")
            st = read_status(state_dir)
            if st and st["sources"] and st["sources"][0]["status"] == "up" and st["sources"][0]["ticks"] >= 1:
                t_up = time.monotonic()
            time.sleep(0.5)
        log.info("%s: up after %.1fs; measuring for %.0fs (metrics scaled to %s s)", preset, t_up - t_start,
                 duration, sorted({scaled(i) for i in intervals.values()}))
        time.sleep(WARM_S)
        pss0, w0 = statements(server), time.time()
        time.sleep(max(0.0, duration - WARM_S))
        pss1, w1 = statements(server), time.time()
        status = fresh_status(state_dir, w1)
        if proc.poll() is not None:
            raise RuntimeError(f"reaper exited with {proc.returncode}: see {logfile}")
    finally:
        stop_process(proc)
    errors = [ln for ln in logfile.read_text(errors="replace").splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert status is not None
    [source] = status["sources"]
    return summarize(preset, intervals, source, pss0, pss1, (w1 - w0) / 60.0, runs_per_metric(output), errors)


def summarize(preset: str, intervals: dict[str, int], source: dict[str, Any], pss0: dict[str, float],
              pss1: dict[str, float], minutes: float, runs: dict[str, int], errors: list[str]) -> dict[str, Any]:
    """Per metric: the mean of its recent runs (reaper's own cost, scaled run) x runs per minute at the
    preset's own interval."""
    cost = source.get("cost") or {}
    metrics = []
    for m in cost.get("metrics", []):
        name = m["metric"]
        if name not in intervals:
            continue
        ran_every = m["effective_interval"] or m["interval"]
        per_run = 60.0 / ran_every  # figures per minute -> per run
        real = 60.0 / intervals[name]
        metrics.append({"metric": name, "interval": intervals[name], "scaled_interval": ran_every,
                        "runs_seen": runs.get(name, 0), "ms_per_run": m["server_ms_per_minute"] / per_run,
                        "server_ms_per_minute": m["server_ms_per_minute"] / per_run * real,
                        "rows_per_minute": m["rows_per_minute"] / per_run * real,
                        "bytes_per_minute": m["bytes_per_minute"] / per_run * real,
                        "scaled_server_ms_per_minute": m["server_ms_per_minute"]})
    metrics.sort(key=lambda x: -x["server_ms_per_minute"])
    pss_ms = (pss1["exec_ms"] - pss0["exec_ms"]) / minutes if minutes > 0 else None
    return {
        "preset": preset, "metrics_in_preset": len(intervals), "metrics_costed": len(metrics),
        "not_costed": sorted(set(intervals) - {m["metric"] for m in metrics}),
        "ran_fewer_than_twice": sorted(m for m in intervals if runs.get(m, 0) < 2),
        "server_ms_per_minute": sum(m["server_ms_per_minute"] for m in metrics),
        "rows_per_minute": sum(m["rows_per_minute"] for m in metrics),
        "bytes_per_minute": sum(m["bytes_per_minute"] for m in metrics),
        "scaled_own_ms_per_minute": cost.get("server_ms_per_minute"),
        "scaled_server_view_ms_per_minute": cost.get("server_view_ms_per_minute"),
        "scaled_pss_ms_per_minute": pss_ms,
        "scaled_pss_calls_per_minute": (pss1["calls"] - pss0["calls"]) / minutes if minutes > 0 else None,
        "pss_window_minutes": minutes,
        "ticks": source["ticks"], "metric_errors": source["metric_errors"], "error_lines": errors[:5],
        "metrics": metrics,
    }


# -- the run -----------------------------------------------------------------------------------

def machine_facts(server: PgServer) -> dict[str, Any]:
    import psutil

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=10"],
                            capture_output=True, text=True).stdout.strip() or "?"
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu, "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "kernel": platform.release(),
            "postgres": server.psql("select version()").split(" on ")[0], "commit": commit,
            "load_before": round(os.getloadavg()[0], 2)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    for leftover in cleanup_stale():
        log.info("removed a stale server directory: %s", leftover)
    run_dir = RUN_ROOT / f"server-cost-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    server = workload = None
    try:
        server = start_server()
        result: dict[str, Any] = {"machine": machine_facts(server), "duration_s": args.duration,
                                  "workload_rate": args.rate, "command": "just bench server-cost"
                                  + (f" --duration {args.duration:g}" if args.duration != 150 else "")}
        result["database"] = prepare(server, run_dir)
        workload = start_workload(server, run_dir, args.rate)
        time.sleep(5)
        server.psql("analyze", dbname=DB)
        result["presets"] = []
        for preset in args.presets.split(","):
            log.info("%s: reaper run", preset)
            r = run_preset(preset, server, run_dir, args.duration)
            log.info("%s: %.1f server ms per minute at the preset's intervals (top: %s); scaled run: own %.0f, "
                     "pg_stat_statements %.0f ms per minute", preset, r["server_ms_per_minute"],
                     ", ".join(m["metric"] for m in r["metrics"][:3]), r["scaled_own_ms_per_minute"] or 0,
                     r["scaled_pss_ms_per_minute"] or 0)
            result["presets"].append(r)
        result["machine"]["load_end"] = round(os.getloadavg()[0], 2)
        return result
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_process(workload, signal.SIGINT)
        if server is not None:
            server.cleanup()
        if args.keep:
            log.info("kept %s", run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


# -- the report --------------------------------------------------------------------------------

def minutes(result: dict[str, Any]) -> int:
    """The bench's length: per preset its run, start-up and stop; the server and its data once."""
    return round((len(result["presets"]) * (result["duration_s"] + 15) + 30) / 60)


def wrap(lines: list[str], width: int) -> list[str]:
    """Prose paragraphs wrapped at `width`; tables, HTML and empty lines as they are."""
    out: list[str] = []
    for line in lines:
        out.extend([line] if not line or line[0] in "|<" else textwrap.wrap(line, width, break_on_hyphens=False,
                                                                              break_long_words=False))
    return out


def num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def top3(r: dict[str, Any]) -> str:
    return ", ".join(f"`{m['metric']}` {num(m['server_ms_per_minute'], 2)}" for m in r["metrics"][:3])


def summary_table(result: dict[str, Any]) -> list[str]:
    lines = ["| preset | metrics | server ms per minute | rows per minute | the 3 most expensive (ms per minute) |",
             "|---|---:|---:|---:|---|"]
    for r in result["presets"]:
        lines.append(f"| `{r['preset']}` | {r['metrics_in_preset']} | {num(r['server_ms_per_minute'], 1)} | "
                     f"{num(r['rows_per_minute'])} | {top3(r)} |")
    return lines


def section(result: dict[str, Any]) -> str:
    m = result["machine"]
    db = result["database"]
    out = [SECTION, "",
           f"Measured {m['date']} by `bench/server_cost.py` (`{result['command']}`, about {minutes(result)} minutes)"
           " on a "
           f"**loaded, shared {m['cores']}-core machine** ({m['cpu']}, {m['ram_gib']} GiB, load average "
           f"{m['load_before']} before, {m.get('load_end', '?')} after; other work was running), {m['postgres']}, "
           f"reaper {m['commit']}.",
           "",
           f"One source per preset on a throwaway server: database `{DB}` ({db['size']}: `pgbench -i -s 5`, "
           f"{db['tables']} tables, {db['indexes']} indexes, {db['functions']} plpgsql functions, a view), "
           f"`pgbench` running throughout at {result['workload_rate']:g} transactions per second (tpcb-like and calls"
           " of the functions), `track_functions = pl`, `track_io_timing = on`, `pg_stat_statements` installed;"
           " reaper's role has only `pg_monitor` and CONNECT.",
           "",
           "**Scaled intervals.** The presets' intervals run up to 7200 s, so each `reaper run` used a config overlay"
           f" with every interval scaled down (interval // {SCALE_DIV}, {SCALE_MIN} to {SCALE_MAX} s) for "
           f"{result['duration_s']:g} s, so that every metric ran at least twice. reaper's own cost (its status "
           "file: the server time of each metric's runs, bracketed inside the tick's statement) gives each"
           " metric's mean per run; the figures below are that mean x the runs per minute at the **preset's own**"
           " interval, i.e. what the preset costs as shipped. Rows per minute likewise.",
           "", *summary_table(result), "",
           "Cross-check on the scaled runs (same schedule, same minutes): reaper's own total against"
           " `pg_stat_statements`' `total_exec_time` of reaper's role in that database (which also holds the"
           " statement around the subqueries, the read-only guard and the cost's own query of that view).", "",
           "| preset | own ms per minute (scaled run) | pg_stat_statements ms per minute | statements per minute |"
           " metrics with < 2 measurements | metric errors |",
           "|---|---:|---:|---:|---|---:|"]
    for r in result["presets"]:
        fewer = ", ".join(f"`{x}`" for x in r["ran_fewer_than_twice"]) or "none"
        out.append(f"| `{r['preset']}` | {num(r['scaled_own_ms_per_minute'], 1)} | "
                   f"{num(r['scaled_pss_ms_per_minute'], 1)} | {num(r['scaled_pss_calls_per_minute'], 1)} | "
                   f"{fewer} | {r['metric_errors']} |")
    out += ["", "Measurements are counted in the jsonfile output: a metric that returns no rows (`replication`"
            " without standbys, `archiver` without archiving) delivers none though it ran; its cost is in the"
            " tables (reaper's own figure needs runs, not rows).", ""]
    for r in result["presets"]:
        out += [f"<details><summary><code>{r['preset']}</code>: every metric</summary>", "",
                "| metric | interval s | ms per run | server ms per minute | rows per minute |",
                "|---|---:|---:|---:|---:|"]
        out += [f"| `{x['metric']}` | {x['interval']} | {num(x['ms_per_run'], 2)} | "
                f"{num(x['server_ms_per_minute'], 2)} | {num(x['rows_per_minute'], 1)} |" for x in r["metrics"]]
        if r["not_costed"]:
            out += ["", "No server cost recorded (no statement of its own on the server: answered by the tick"
                    " itself, read on reaper's host, or no SQL for this PostgreSQL): "
                    + ", ".join(f"`{x}`" for x in r["not_costed"]) + "."]
        out += ["", "</details>", ""]
    out = wrap(out, 110)
    out += [f"<!-- server-cost-data {json.dumps(result, separators=(',', ':'))} -->", ""]
    return "\n".join(out)


def update_benchmarks(path: Path, result: dict[str, Any]) -> None:
    """Replace (or append at the end) this section only; the rest of the file is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    new = section(result)
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + new
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + new + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text)


def update_readme(path: Path, result: dict[str, Any]) -> None:
    """The paragraph "What reaper costs each server" of "Deploying on production servers", with the table."""
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        log.warning("README: no paragraph %r before %r; left alone", README_START, README_END)
        return
    m = result["machine"]
    new = "\n".join(wrap([
        README_START + " Per source, one connection (two while it runs slow or timed metrics) and one"
        " statement per tick. Server time of reaper's statements per source, measured by `just bench server-cost`"
        f" ({m['postgres'].split(' (')[0]}, a database of `pgbench -i -s 5` plus a few tables and functions,"
        f" pgbench running at {result['workload_rate']:g} tps, a `pg_monitor` role; measured on a loaded, shared"
        f" {m['cores']}-core machine, at each preset's own intervals):",
        "", *summary_table(result), "",
        "Details, the method (intervals scaled down for the run, projected back per run) and the cross-check with"
        " `pg_stat_statements`: [docs/benchmarks.md](docs/benchmarks.md#server-cost-per-source). The figures grow"
        " with the number of tables, indexes, functions and statements the server has. A running reaper measures"
        " it itself, per metric, and can keep it under a budget: see \"Budget and cost\" below.", "", ""], 105))
    path.write_text(text[:start] + new + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=150.0,
                        help="seconds of each preset's run after its first tick (default 150: the scaled 60 s "
                             "metrics run three times)")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--rate", type=float, default=5.0, help="pgbench transactions per second (default 5)")
    parser.add_argument("--keep", action="store_true", help=f"keep the run directory under {RUN_ROOT}")
    parser.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--no-report", action="store_true", help="print the results; leave the docs alone")
    parser.add_argument("--from-json", metavar="FILE", help="render the docs from a saved result, no run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        try:
            result = measure(args)
        except KeyboardInterrupt:
            log.error("interrupted: everything started was stopped")
            return 130
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        (RUN_ROOT / "last-server-cost.json").write_text(json.dumps(result))
    if args.no_report:
        print(json.dumps(result, indent=2))
        return 0
    update_benchmarks(Path(args.report), result)
    update_readme(Path(args.readme), result)
    log.info("wrote the section %r of %s and README's cost paragraph", SECTION, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
