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


# values PostgreSQL holds and Python's datetime/timedelta cannot (each used to take the source down for good:
# "unexpected error (a bug); restarting", every metric of the source lost, `reaper once` a traceback)
FAR = ("select 1 as k, '0044-03-15 BC'::date as ides, '10000-01-01'::timestamp as far, '24:00:00'::time as midnight, "
       "interval '100000000 years' as eon, array['0044-03-15 BC'::date] as dates, "
       "daterange('0044-01-01 BC', '2020-01-01') as span")
NEAR = "select '2020-01-02'::date as d, 1.5::float8 as x"  # ordinary dates stay dates
WHOLE_ROW = "select c as whole from pg_class as c where c.relname = 'pg_class'"  # asyncpg cannot read this type


def test_dates_python_cannot_hold_come_as_text_and_never_take_the_source_down(pg15, fresh_db,
                                                                               tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                      + metric("far", FAR) + metric("near", NEAR) + metric("whole", WHOLE_ROW) + metric("ping", PING)
                      + f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n'
                        'metrics = { far = 60, near = 60, whole = 60, ping = 60 }\n')
    done = subprocess.run([*REAPER, "once", "--config", str(config), "--format", "json"], capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in done.stderr and ": down:" not in done.stderr, done.stderr
    found = {r["metric"]: r for r in json.loads(done.stdout)}
    assert [r["v"] for r in found["ping"]["rows"]] == [1]
    far = found["far"]["rows"][0]
    assert (far["k"], far["ides"], far["far"], far["midnight"], far["eon"], far["dates"], far["span"]) == (
        1, "0044-03-15 BC", "10000-01-01 00:00:00", "24:00:00", "100000000 years", ["0044-03-15 BC"],
        '["0044-01-01 BC",2020-01-01)')
    assert found["near"]["rows"] == [{"d": "2020-01-02", "x": 1.5, **{k: v for k, v in found["near"]["rows"][0].items()
                                                                      if k not in ("d", "x")}}]
    assert found["whole"]["outcome"] == "failed"
    [whole] = [line for line in done.stderr.splitlines() if "metric whole" in line]
    assert "cannot decode" in whole and "cast the column to text in the metric's SQL" in whole, whole
    [said] = [line for line in done.stderr.splitlines() if "metric far" in line]
    assert "its date and time columns are sent as text from now on" in said, said


def test_a_source_with_such_a_metric_keeps_collecting_it_in_its_one_statement_per_tick(pg15, fresh_db,
                                                                                      tmp_path: Path) -> None:
    from tests.test_daemon import Daemon, wait_until

    daemon = Daemon(tmp_path)
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)],
                        extra=metric("far", FAR) + metric("whole", WHOLE_ROW))
    daemon.config.write_text(daemon.config.read_text().replace("metrics = { ping = 1 }",
                                                               "metrics = { ping = 1, far = 1, whole = 1 }"))
    daemon.start()
    try:
        def delivered(name: str) -> int:
            return sum(1 for d in daemon.lines() if d["metric"] == name)

        wait_until(lambda: delivered("far") >= 4 and delivered("ping") >= 4, what="four ticks of far and ping")
        [source] = daemon.fresh_status().sources
        assert source.status == "up" and source.statements_last_tick == 1, source
        assert [d["data"][0]["ides"] for d in daemon.lines() if d["metric"] == "far"][-1] == "0044-03-15 BC"
        assert delivered("whole") == 0
    finally:
        assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert ": down:" not in log and "a bug" not in log, log
    assert log.count("its date and time columns are sent as text") == 1, log
