"""Metrics whose columns asyncpg cannot read inside the batch's records (reaper.db.recordsafe), from outside.

A custom metric selecting money, tsvector, macaddr, a reg* type, an enum, an array of money and a domain's
value (information_schema's ordinal_position) used to take the whole source down ("no decoder for composite
type element", read as a broken connection) or to deliver garbage (a tsvector's binary bytes as text). Now
each value is the one the metric gives alone, and the metric beside it in the batch is collected too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]

ODD = ("select 12.5::money as m, 'a b'::tsvector as tsv, '08:00:2b:01:02:03'::macaddr as mac, "
       "'pg_class'::regclass as rc, 'ok'::reaper_mood as mood, array[1.5::money] as am")
DOMAIN = ("select ordinal_position as n, column_name::text as col from information_schema.columns "
          "where table_schema = 'pg_catalog' and table_name = 'pg_database' and ordinal_position <= 2 "
          "order by ordinal_position")
PING = "select 1 as v"


def metric(name: str, sql: str) -> str:
    return f'[metrics.{name}]\ndescription = "{name}"\ngauges = ["*"]\n[metrics.{name}.sql]\n14 = "{sql}"\n'


def test_odd_column_types_are_read_as_alone_and_never_take_the_source_down(pg15, fresh_db,
                                                                          tmp_path: Path) -> None:
    pg15.psql("create type reaper_mood as enum ('sad', 'ok')", dbname=fresh_db)
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                      + metric("odd", ODD) + metric("domain", DOMAIN) + metric("ping", PING)
                      + f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n'
                        'metrics = { odd = 60, domain = 60, ping = 60 }\n')
    done = subprocess.run([*REAPER, "once", "--config", str(config), "--format", "json"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {r["metric"]: r["rows"] for r in json.loads(done.stdout)}
    assert [r["v"] for r in rows["ping"]] == [1]
    odd = rows["odd"][0]
    assert (odd["m"], odd["tsv"], odd["mac"], odd["rc"], odd["mood"], odd["am"]) == (
        "$12.50", "'a' 'b'", "08:00:2b:01:02:03", "pg_class", "ok", ["$1.50"])
    assert [(r["n"], r["col"]) for r in rows["domain"]] == [(1, "oid"), (2, "datname")]
    assert "down" not in done.stderr and "Traceback" not in done.stderr, done.stderr
