"""Metric SQL as people write it, from outside (`reaper once` and `reaper check --connect` as processes).

reaper wraps each metric's query in its own statements (the tick's combined SELECT, the read-only wrapper, the
one-round-trip description, the text casts): a query ending in a `--` comment swallowed the wrapper's closing
parenthesis, and the metric failed at every run with "syntax error at end of input" while `check` accepted it
and psql ran it fine. A comment at the end is now just a comment, wherever the query is sent. And a query
reading a table with `*` whose columns change under the running daemon keeps every value under its own name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]

FORMS = {
    "same_line": "select 1 as v -- the answer",
    "last_line": "select 2 as v\n-- a note on its own line",
    "timed": "select 3 as v -- runs under its own timeout, outside the batch",
    "money": "select 4::money as m -- a column sent as text inside the batch",
}


def test_a_query_ending_in_a_comment_collects_in_every_way_it_is_sent(pg15, fresh_db, tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    text = [f'[collector]\nstate_dir = "{tmp_path / "state"}"\n']
    for name, sql in FORMS.items():
        timeout = "statement_timeout_seconds = 5\n" if name == "timed" else ""
        text.append(f'[metrics.{name}]\ngauges = ["*"]\n{timeout}[metrics.{name}.sql]\n14 = {json.dumps(sql)}\n')
    text.append(f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n'
                f'metrics = {{ {", ".join(f"{n} = 60" for n in FORMS)} }}\n'
                f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n')
    config.write_text("".join(text))
    assert subprocess.run([*REAPER, "check", "--config", str(config)], capture_output=True, timeout=60).returncode == 0
    done = subprocess.run([*REAPER, "once", "--config", str(config), "--format", "json"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and " ERROR " not in done.stderr, done.stderr
    rows = {r["metric"]: r["rows"] for r in json.loads(done.stdout)}
    assert {n: [{k: v for k, v in r.items() if k in ("v", "m")} for r in rows[n]] for n in FORMS} == {
        "same_line": [{"v": 1}], "last_line": [{"v": 2}], "timed": [{"v": 3}], "money": [{"m": "$4.00"}]}
    checked = subprocess.run([*REAPER, "check", "--config", str(config), "--connect", "--format", "json"],
                             capture_output=True, text=True, timeout=120)
    [source] = json.loads(checked.stdout)["sources"]
    assert {m["metric"]: m["status"] for m in source["metrics"]} == dict.fromkeys(FORMS, "collect"), source


def test_a_table_read_with_star_that_changes_under_the_daemon_never_shifts_values(pg15, fresh_db,
                                                                                   tmp_path: Path) -> None:
    """A record carries no names: the batch read a metric's values by position under the names described when
    it was first seen. `select * from app_table` and a column dropped: every later row had its values shifted
    under the wrong names (b's value as "a"), silently; a text landing under a float's name crashed the source
    at every tick. The batch now takes the columns by name: such a change fails the statement once, the metric
    is described again, and every row keeps its names."""
    from test_daemon import Daemon, wait_until

    pg15.psql("create table app_t (a int, b int, x float8); insert into app_t values (1, 2, 1.5)", dbname=fresh_db)
    daemon = Daemon(tmp_path)
    daemon.write_config([("s", pg15.dsn(dbname=fresh_db), 1)],
                        extra='[metrics.app]\ngauges = ["*"]\nsql = { 14 = "select * from app_t" }\n')
    daemon.config.write_text(daemon.config.read_text().replace("metrics = { ping = 1 }",
                                                               "metrics = { ping = 1, app = 1 }"))

    def apps() -> list[dict]:
        return [{k: v for k, v in d["data"][0].items() if k in ("a", "b", "x")}
                for d in daemon.lines() if d["metric"] == "app"]

    daemon.start()
    try:
        wait_until(lambda: len(apps()) >= 2, what="two rows of app")
        pg15.psql("alter table app_t drop column a", dbname=fresh_db)
        wait_until(lambda: {"b": 2, "x": 1.5} in apps(), what="a row without the dropped column")
        pg15.psql("alter table app_t alter column x type text using 'hello'", dbname=fresh_db)
        wait_until(lambda: {"b": 2, "x": "hello"} in apps(), what="a row with the column's new type")
        pings = sum(1 for d in daemon.lines() if d["metric"] == "ping")
        wait_until(lambda: sum(1 for d in daemon.lines() if d["metric"] == "ping") > pings + 1, what="more pings")
    finally:
        assert daemon.stop() == 0
    assert set(map(str, apps())) <= {str({"a": 1, "b": 2, "x": 1.5}), str({"b": 2, "x": 1.5}),
                                     str({"b": 2, "x": "hello"})}, apps()
    log = daemon.log.read_text()
    assert "a bug" not in log and ": down:" not in log, log


def test_a_query_that_names_two_columns_alike_is_said_once(pg15, fresh_db, tmp_path: Path) -> None:
    """`select count(*) as n, sum(x) as n`: a row holds one value per name, so the first never reached a sink,
    and nothing said so. The collector now says it once per metric (the batch and alone alike)."""
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                      '[metrics.twice]\ngauges = ["*"]\nsql = { 14 = "select 1 as n, 2 as n, 3 as m, 4 as m" }\n'
                      '[metrics.once]\ngauges = ["*"]\nsql = { 14 = "select 5 as n" }\n'
                      f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\nmetrics = {{ twice = 60, '
                      f'once = 60 }}\n[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n')
    done = subprocess.run([*REAPER, "once", "--config", str(config), "--format", "json"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {r["metric"]: r["rows"] for r in json.loads(done.stdout)}
    assert {k: rows["twice"][0][k] for k in ("n", "m")} == {"n": 2, "m": 4} and rows["once"][0]["n"] == 5
    said = [line for line in done.stderr.splitlines() if "more than one column" in line]
    assert len(said) == 1 and " WARNING " in said[0] and "metric twice " in said[0] and "'m', 'n'" in said[0], said
    checked = subprocess.run([*REAPER, "check", "--config", str(config), "--connect", "--format", "json"],
                             capture_output=True, text=True, timeout=120)
    verdicts = {m["metric"]: m for m in json.loads(checked.stdout)["sources"][0]["metrics"]}
    assert verdicts["once"]["status"] == "collect" and verdicts["twice"]["status"] == "partial", verdicts
    assert any("more than one column 'm', 'n'" in r for r in verdicts["twice"]["reasons"]), verdicts["twice"]
