"""`reaper check --connect` (issue 15 item 1): which metrics a role will collect, and the exact fix for the rest.

The derivation of needs is unit-tested over every shipped metric. On real PostgreSQL 15 and 18 servers a
role with only LOGIN, then with pg_monitor, then with pg_monitor + pg_read_server_files is checked, and
the metrics the check says are skipped are compared with what `reaper once` (the real collector) fails
or does not collect: the same set. Then the printed SQL script is run as a superuser and a second check
reports every metric of `full` collectable except the ones no statement can give on this machine (no
SQL for the version; pg_qualstats not installed here), and a short `reaper run` logs no error line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import freshstatus
import pytest
from pgserver import PgServer

from reaper.catalog.metrics import Catalog
from reaper.catalog.requirements import metric_needs, settings_read, sql_needs

REAPER = [sys.executable, "-m", "reaper.cli"]
MAJORS = (14, 15, 16, 17, 18)


# -- derivation (pure) ------------------------------------------------------------------------------

def test_every_shipped_metric_has_its_needs_derived_for_every_version() -> None:
    catalog = Catalog.for_config()
    for major in MAJORS:
        for name, metric in catalog.metrics.items():
            needs = metric_needs(metric, major, catalog.metrics)
            if metric.special:
                continue
            assert needs.no_sql == (metric.sql_for(major) is None), (name, major)
            assert set(metric.requires_extension) <= set(needs.extensions), name
            if not needs.no_sql and "postgres" in metric.source_kinds:
                assert needs.functions or needs.relations, (name, major)  # every query reads something


def test_known_needs_are_found_in_the_shipped_sql() -> None:
    catalog = Catalog.for_config()
    needs = {n: metric_needs(m, 16, catalog.metrics) for n, m in catalog.metrics.items()}
    assert "pg_ls_waldir" in needs["wal_size"].functions
    assert "pg_ls_archive_statusdir" in needs["archiver_pending_count"].functions
    assert "pg_stat_statements" in needs["stat_statements"].extensions  # from the relation it reads
    assert "pg_stat_activity" in needs["stat_activity"].relations
    assert "shared_preload_libraries" in needs["settings_num"].settings or any(
        "shared_preload_libraries" in n.settings for n in needs.values())
    assert needs["cpu_load"].local_only and {"data_directory", "log_directory"} <= needs["cpu_load"].settings
    assert needs["smart_health_per_disk"].tool == ("smartctl", "Debian package smartmontools")
    assert needs["backup_age_pgbackrest"].tool is not None and needs["backup_age_walg"].tool is not None
    assert "pg_ls_logdir" in needs["server_log_event_counts"].remote_functions
    assert [s.name for s in needs["sproc_stats"].server_settings] == ["track_functions"]
    # change_events runs the hash metrics: their needs are its own
    assert needs["sproc_hashes"].relations <= needs["change_events"].relations


def test_comments_strings_and_aliases_are_not_needs() -> None:
    needs = sql_needs("select 'pg_ls_waldir()' as a, /* pg_read_file(x) */ count(*) -- pg_stat_file(y)\n"
                      "from pg_stat_activity a join lateral (select 1) t on true, unnest(array[1]) u")
    assert needs.functions == {"count", "unnest"}
    assert "pg_stat_activity" in needs.relations and "lateral" not in needs.relations
    assert settings_read("select current_setting('data_directory'), current_setting ( 'Block_Size' )") == {
        "data_directory", "block_size"}
    assert settings_read("select 'current_setting(''x'')'") == set()


# -- real servers ------------------------------------------------------------------------------------

def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REAPER, *args], capture_output=True, text=True, timeout=timeout)


def _check(config: Path, *extra: str) -> dict[str, Any]:
    proc = _run(["check", "--config", str(config), "--connect", "--format", "json", *extra])
    assert proc.returncode == 0, proc.stderr
    document: dict[str, Any] = json.loads(proc.stdout)
    return document


def _verdicts(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [source] = document["sources"]
    assert source["reachable"], source
    return {m["metric"]: m for m in source["metrics"]}


def _not_collected_by_once(config: Path) -> set[str]:
    proc = _run(["once", "--config", str(config), "--format", "json"])
    rows = json.loads(proc.stdout)
    return {r["metric"] for r in rows if r.get("outcome") in ("failed", "not collected")}


@pytest.fixture(params=[15, 18], ids=lambda m: f"pg{m}")
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    # logging_collector + csvlog: server_log_event_counts can collect once the role may read the settings
    pg = PgServer.create(major=request.param, settings={"logging_collector": "on", "log_destination": "csvlog"})
    try:
        pg.psql("CREATE ROLE reaper LOGIN PASSWORD 'pw-check'")
        yield pg
    finally:
        pg.cleanup()


def _config(pg: PgServer, tmp_path: Path) -> Path:
    path = tmp_path / "reaper.toml"
    path.write_text(f"""
[collector]
state_dir = "{tmp_path / 'state'}"

[[sources]]
name = "main"
dsn = "{pg.dsn(user='reaper', password='pw-check')}"
preset = "full"

[[sinks]]
type = "jsonfile"
name = "out"
path = "{tmp_path / 'out.jsonl'}"
""")
    return path


def _skipped(verdicts: dict[str, dict[str, Any]]) -> set[str]:
    return {n for n, v in verdicts.items() if v["status"] == "skip"}


def test_check_connect_names_each_missing_grant_and_agrees_with_the_collector(server: PgServer,
                                                                              tmp_path: Path) -> None:
    config = _config(server, tmp_path)

    # 1. LOGIN only
    doc = _check(config)
    source = doc["sources"][0]
    assert source["role"] == "reaper" and source["memberships"] == [] and source["in_recovery"] is False
    assert source["major"] == server.major
    verdicts = _verdicts(doc)
    assert _skipped(verdicts) == _not_collected_by_once(config)
    assert verdicts["wal_size"]["fixes"] == ["GRANT pg_monitor TO reaper;"]
    assert verdicts["wal_size"]["reasons"] == ["no EXECUTE on pg_ls_waldir()"]
    assert verdicts["cpu_load"]["fixes"] == ["GRANT pg_read_all_settings TO reaper;"]
    assert verdicts["stat_statements"]["fixes"] == ["CREATE EXTENSION IF NOT EXISTS pg_stat_statements;"]
    assert verdicts["stat_activity"]["status"] == "partial"
    assert verdicts["stat_activity"]["fixes"] == ["GRANT pg_read_all_stats TO reaper;"]
    assert verdicts["db_size"]["status"] == "collect"
    assert "GRANT pg_monitor TO reaper;" in source["summary"] and source["summary"].startswith("main: ")

    # 2. pg_monitor
    server.psql("GRANT pg_monitor TO reaper")
    doc = _check(config)
    assert "pg_monitor" in doc["sources"][0]["memberships"]
    verdicts = _verdicts(doc)
    assert _skipped(verdicts) == _not_collected_by_once(config)
    assert verdicts["wal_size"]["status"] == verdicts["cpu_load"]["status"] == "collect"
    assert verdicts["stat_activity"]["status"] == "collect"
    assert not any("GRANT" in f for v in verdicts.values() for f in v["fixes"])

    # 3. pg_monitor + pg_read_server_files: the log is read locally here, so nothing more collects
    server.psql("GRANT pg_read_server_files TO reaper")
    verdicts3 = _verdicts(_check(config))
    assert _skipped(verdicts3) == _skipped(verdicts) == _not_collected_by_once(config)

    # the fleet script, run as a superuser
    script = tmp_path / "fix.sql"
    _check(config, "--sql-out", str(script))
    text = script.read_text()
    assert "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;" in text and "\\connect postgres" in text
    server.psql(text)
    verdicts = _verdicts(_check(config))
    for name, v in verdicts.items():
        if v["status"] == "skip":  # only what no statement can give on this machine
            assert all("no SQL for PostgreSQL" in r or "is not available on the server" in r
                       for r in v["reasons"]), (name, v)
    assert {n for n, v in verdicts.items() if v["status"] == "skip"} <= {"stat_lock", "reco_add_index"}
    assert _skipped(verdicts) == _not_collected_by_once(config)

    # a short real run collects them without an error line
    log = tmp_path / "run.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
        try:
            wanted = {n for n, v in verdicts.items() if v["status"] != "skip"} - {"server_log_event_counts"}
            out = tmp_path / "out.jsonl"
            deadline = time.monotonic() + 40
            seen: set[str] = set()
            ran: set[str] = set()  # a metric whose query returns no row delivers nothing: its run is in the status
            while time.monotonic() < deadline and not wanted <= seen | ran:
                if out.exists():
                    seen = {json.loads(line)["metric"] for line in out.read_text().splitlines() if line.strip()}
                status = freshstatus.polled(proc.pid, tmp_path / "state")
                ran = {m.metric for s in status.sources if s.cost for m in s.cost.metrics} if status else set()
                time.sleep(0.2)
            assert wanted <= seen | ran, sorted(wanted - seen - ran)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
    assert not errors, errors
    # metrics with 0 rows deliver nothing; those that have rows here are all there
    assert {"db_stats", "db_size", "wal_size", "cpu_load", "stat_statements_calls", "settings_num"} <= seen


def test_unreachable_source_exits_1_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(f"""
[collector]
state_dir = "{tmp_path / 'state'}"
[[sources]]
name = "gone"
dsn = "postgresql://reaper@127.0.0.1:1/postgres"
connect_timeout_seconds = 2
[[sinks]]
type = "jsonfile"
name = "out"
path = "{tmp_path / 'out.jsonl'}"
""")
    proc = _run(["check", "--config", str(config), "--connect", "--format", "plain"])
    assert proc.returncode == 1
    assert proc.stdout.startswith("source\tgone\tunreachable\t")
    assert [line for line in proc.stderr.splitlines() if "gone" in line] == [
        line for line in proc.stderr.splitlines() if line.startswith("source gone: unreachable: ")]


def test_a_metric_whose_sql_fails_on_the_server_is_not_said_to_collect(pg15, fresh_db, tmp_path: Path) -> None:
    """`check --connect` judged a metric by the catalog objects its SQL names, so a custom metric with a misspelt
    column, a table that is not there or a column type reaper cannot read was "will collect", then failed at
    every run. Each active metric's SQL is now prepared (never run) on the connection: the same failure as the
    collector's, before the first tick."""
    config = tmp_path / "reaper.toml"
    custom = {"typo": "select relnam as n from pg_class limit 1", "gone": "select count(*) as n from no_such_table",
              "whole": "select c as whole from pg_class as c where c.relname = 'pg_class'",
              "good": "select count(*) as n from pg_class"}
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                      + "".join(f'[metrics.{n}]\ngauges = ["*"]\nsql = {{ 11 = "{sql}" }}\n'
                                for n, sql in custom.items())
                      + f'[[sources]]\nname = "main"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n'
                        'metrics = { typo = 60, gone = 60, whole = 60, good = 60, db_stats = 60 }\n'
                      + f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.jsonl"}"\n')
    proc = _run(["check", "--config", str(config), "--connect", "--format", "json"])
    assert proc.returncode == 1, proc.stderr  # a metric whose SQL fails is a config's mistake, like a bad key
    document = json.loads(proc.stdout)
    verdicts = _verdicts(document)
    assert {n for n, v in verdicts.items() if v["status"] == "fails"} == {"typo", "gone", "whole"}, verdicts
    assert {n: v["status"] for n, v in verdicts.items() if n in ("good", "db_stats")} == {
        "good": "collect", "db_stats": "collect"}
    assert 'column "relnam" does not exist (SQLSTATE 42703)' in verdicts["typo"]["reasons"][0]
    assert "no_such_table" in verdicts["gone"]["reasons"][0] and "search_path" in verdicts["gone"]["reasons"][0]
    assert "cast the column to text" in verdicts["whole"]["reasons"][0]
    assert document["sources"][0]["summary"] == "main: 2 of 5 metrics will collect; 3 will fail (their SQL: see above)"
    assert _not_collected_by_once(config) == {"typo", "gone", "whole"}  # the collector agrees
    plain = _run(["check", "--config", str(config), "--connect", "--format", "plain"])
    assert plain.returncode == 1
    assert sorted(line.split(":")[1] for line in plain.stderr.splitlines()) == [
        " metric gone", " metric typo", " metric whole"], plain.stderr  # one line each


def test_a_setting_only_a_restart_applies_is_said_so_in_the_summary(pg15, fresh_db, tmp_path: Path) -> None:
    """The summary line joins every fix and used to cut each one's "-- then restart the server": its fixes for
    server_log_event_counts read `ALTER SYSTEM SET logging_collector = 'on'; ... SELECT pg_reload_conf();`, and a
    DBA who ran them got a reload, which never turns logging_collector on."""
    assert pg15.psql("show logging_collector") == "off"
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[[sources]]\nname = "main"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n'
                      'metrics = { server_log_event_counts = 60, db_stats = 60 }\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.jsonl"}"\n')
    summary = _check(config)["sources"][0]["summary"]
    assert "ALTER SYSTEM SET logging_collector = 'on';" in summary, summary
    assert summary.endswith("-- then restart the server"), summary
