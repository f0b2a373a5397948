"""pgwatch's dashboards read reaper's storage: after a short real `reaper run` with the `exhaustive` and
`full` presets into a postgres sink, every stored column the kinds table (tests/data/pgwatch_kinds.tsv)
calls integer casts with `(data->>'col')::int8` over the whole table, numbers with `::float8` and
booleans with `::bool`, as the dashboards do.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pgserver import ServerHandle, quote_ident
from test_value_kinds import KINDS, METRICS

pytestmark = pytest.mark.pg

REAPER = [sys.executable, "-m", "reaper.cli"]
CASTS = {"integer": "int8", "number": "float8", "boolean": "bool"}
RUN_LIMIT_SECONDS = 45


def wait_until(predicate: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def stored_tables(server: ServerHandle, dbname: str) -> dict[str, int]:
    out = server.psql("select c.relname, coalesce(c.reltuples, 0)::int8 from pg_class c "
                      "join pg_namespace n on n.oid = c.relnamespace "
                      "where n.nspname = 'public' and c.relkind = 'p'", dbname=dbname)
    tables = {}
    for line in out.splitlines():
        name, _ = line.split("|")
        count = server.psql(f"select count(*) from public.{quote_ident(name)}", dbname=dbname)
        tables[name] = int(count)
    return tables


def test_stored_values_cast_as_pgwatch_dashboards_cast_them(pg15: ServerHandle, fresh_db: str, tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(f"""
[collector]
state_dir = "{tmp_path / 'state'}"

[[sinks]]
type = "postgres"
dsn = "{pg15.dsn(dbname=fresh_db)}"
batching_delay_seconds = 0.2

[[sources]]
name = "exhaustive"
dsn = "{pg15.dsn()}"
preset = "exhaustive"

[[sources]]
name = "full"
dsn = "{pg15.dsn()}"
preset = "full"
""")
    log = tmp_path / "reaper.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        seen: list[dict[str, int]] = []

        def settled() -> bool:  # the first ticks are stored: no new table for two polls in a row
            if proc.poll() is not None:
                raise AssertionError(f"reaper exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            seen.append({t: n for t, n in stored_tables(pg15, fresh_db).items() if n})
            return len(seen) > 3 and len(seen[-1]) >= 10 and set(seen[-1]) == set(seen[-3])

        wait_until(settled, RUN_LIMIT_SECONDS, "the first ticks to be stored")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    stored = seen[-1]
    failures: list[str] = []
    checked = 0
    for name, columns in sorted(KINDS.items()):
        table = METRICS[name].storage_name or name
        if table not in stored:
            continue
        for column, (kind, _note) in columns.items():
            cast = CASTS.get(kind)
            if cast is None:
                continue
            sql = f"select count((data->>'{column}')::{cast}) from public.{quote_ident(table)}"
            try:
                pg15.psql(sql, dbname=fresh_db)
                checked += 1
            except Exception as e:
                failures.append(f"{table}.{column}::{cast}: {str(e).splitlines()[-1]}")
    assert failures == []
    assert checked > 50, f"only {checked} columns checked; stored tables: {sorted(stored)}"
