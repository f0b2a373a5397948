"""`reaper import-pgwatch metrics|sources`: pgwatch's YAML as reaper TOML, run as a real process.

The inputs are our own pgwatch-format files (tests/data/pgwatch/), covering every source field and kind
and every metric field (notes/pgwatch.md sections 2 and 3.1), plus the usual mistakes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pgserver import ServerHandle

from reaper.catalog.pgwatch.sources import import_sources
from reaper.catalog.sqltext import clean_sql
from reaper.config.libpq import keyword_dsn_to_uri, parse_keyword_dsn

REAPER = [sys.executable, "-m", "reaper.cli"]
DATA = Path(__file__).parent / "data" / "pgwatch"
SOURCES = DATA / "sources.yaml"
METRICS = DATA / "metrics.yaml"
# the variables tests/data/pgwatch/sources.yaml takes from the environment, as pgwatch would
ENV = {"REAPER_T_DSN": "postgresql://monitor@db9.example.com/app", "REAPER_T_NAME": "from-env",
       "REAPER_T_GROUP": "env-group", "REAPER_T_KIND": "postgres-discovery", "REAPER_T_INCLUDE": "^app_.*$",
       "REAPER_T_PRESET": "basic", "REAPER_T_STANDBY": "basic"}


def reaper(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REAPER, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def notes(proc: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    """The report lines, without the file name every one of them starts with."""
    lines = proc.stderr.splitlines()
    prefix = f"{path}: "
    assert all(line.startswith(prefix) for line in lines), proc.stderr
    return [line.removeprefix(prefix) for line in lines]


def check(config: Path, env: dict[str, str] | None = None) -> None:
    proc = reaper("check", "--config", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{config}: ok:")


# -------------------------------------------------------------------------------------------------
# sources.yaml


@pytest.fixture(scope="module")
def sources_run() -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, object]]]:
    proc = reaper("import-pgwatch", "sources", str(SOURCES))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = tomllib.loads(proc.stdout)
    return proc, {src["name"]: src for src in doc["sources"]}


def test_sources_every_field_mapped(sources_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, by_name = sources_run
    assert by_name["prod-main"] == {
        "name": "prod-main", "dsn": "postgresql://monitor@db1.example.com:5432/app?sslmode=require",
        "kind": "postgres", "group": "production", "preset": "standard", "metrics": {"locks": 60, "wal": 0},
        "standby_preset": "basic", "standby_metrics": {"wal_receiver": 120},
        "tags": {"env": "prod", "rack": "3"}, "only_if_primary": False,
    }
    assert by_name["cluster-a"] == {
        "name": "cluster-a", "dsn": "postgresql://monitor@db3.example.com/postgres", "kind": "postgres-discovery",
        "group": "discovery", "preset": "exhaustive", "include_pattern": "^(app|sales)_.*$",
        "exclude_pattern": "_test$",
    }
    assert by_name["bouncer"]["kind"] == "pgbouncer" and by_name["bouncer"]["preset"] == "pgbouncer"
    assert by_name["pool"]["kind"] == "pgpool" and by_name["pool"]["enabled"] is False
    assert by_name["patroni-etcd"] == {
        "name": "patroni-etcd", "dsn": "etcd://10.0.0.9:2379,10.0.0.10:2379/service/batman", "kind": "patroni",
        **{k: v for k, v in by_name["patroni-etcd"].items() if k not in ("name", "dsn", "kind")},
    }
    assert "patroni-pg" not in by_name  # a patroni source must name etcd, not a PostgreSQL server
    # is_enabled: true is reaper's default; only false is written
    assert "enabled" not in by_name["prod-main"]


def test_sources_dsn_conversion(sources_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, by_name = sources_run
    # key=value with quoting and an escaped quote, kept password, extra keys as URI parameters
    assert by_name["keyword-dsn"]["dsn"] == (
        "postgresql://monitor:se%20cr%27et@db2.example.com:6432/sales%20db?sslmode=verify-full")
    # a unix socket directory goes into the host parameter
    assert by_name["pool"]["dsn"] == "postgresql://monitor@/postgres?host=/var/run/pgpool&port=9999"
    # $VAR -> ${VAR}: reaper expands variables in every string of a source, as pgwatch does
    env_source = by_name["${REAPER_T_NAME}"]
    assert env_source == {"name": "${REAPER_T_NAME}", "dsn": "${REAPER_T_DSN}", "kind": "${REAPER_T_KIND}",
                          "group": "${REAPER_T_GROUP}", "preset": "${REAPER_T_PRESET}",
                          "standby_preset": "${REAPER_T_STANDBY}", "include_pattern": "${REAPER_T_INCLUDE}"}


def test_sources_intervals_and_duplicates(sources_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, by_name = sources_run
    assert by_name["keyword-dsn"]["metrics"] == {"db_stats": 61, "kpi": 0}
    assert by_name["forgotten"]["enabled"] is False  # pgwatch skips a source without is_enabled: true
    assert by_name["prod-main_2"]["dsn"] == "postgresql://monitor@db8.example.com/app"


def test_sources_report_every_change(sources_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    proc, _ = sources_run
    lines = notes(proc, SOURCES)
    expected_starts = [
        "sources[0].custom_metrics: given with preset_metrics: pgwatch then uses only the preset",
        "sources[0].custom_metrics_standby: given with preset_metrics_standby",
        "sources[0].custom_tags.rack: 3 written as the text '3'",
        "sources[1].conn_str: libpq key=value string written as a postgresql:// URI",
        "sources[1].conn_str: has a password in it, kept as it is: better put ${ENV_VAR} in the dsn",
        "sources[1].custom_metrics.db_stats: interval 60.5 is not whole seconds; rounded up to 61",
        "sources[1].custom_metrics.kpi: interval -1 disables the metric in pgwatch; written as 0 (disabled)",
        "sources[2].kind: 'postgres-continuous-discovery' written as 'postgres-discovery'",
        "sources[4].conn_str: libpq key=value string written as a postgresql:// URI",
        "sources[5].is_superuser: not used by reaper; dropped",
        "sources[5].host_config: not supported by reaper",
        "sources[5]: reaper would reject it (dsn: expected etcd://",
        "sources[6].kind: 'patroni-namespace-discovery' written as 'patroni'",
        "sources[7].conn_str: pgwatch reads it from $REAPER_T_DSN: written as dsn = \"${REAPER_T_DSN}\"",
        "sources[8].kind: 'prometheus': pgwatch's prometheus kind scrapes an exporter, which reaper does not do; "
        "the source is written commented out",
        "sources[8].conn_str: the address is http://...",
        "sources[9].kind: 'oracle': an unknown kind",
        "sources[10].stmt_timeout: a pgwatch v2 key that pgwatch v3 ignores",
        "sources[10].dbname_include_pattern: a pgwatch v2 key that pgwatch v3 ignores; the v3 key is include_pattern; "
        "dropped",
        "sources[10].colour: unknown field (pgwatch ignores it too); dropped",
        "sources[10].is_enabled: not set: pgwatch does not monitor a source unless is_enabled is true; written as "
        "enabled = false",
        "sources[11].name: 'prod-main' is also the name of sources[0]",
    ]
    assert len(lines) == len(expected_starts), "\n".join(lines)
    for line, start in zip(lines, expected_starts, strict=True):
        assert line.startswith(start), (line, start)
    # no password ever appears in a report line
    assert "se cr" not in proc.stderr


def test_sources_header_and_commented_out(sources_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    proc, by_name = sources_run
    text = proc.stdout
    assert text.startswith(f"# Imported from pgwatch's sources file {SOURCES}\n")
    assert "#   sources[10].colour: unknown field (pgwatch ignores it too); dropped\n" in text
    # what reaper cannot load is kept, as comments
    for name in ("patroni-pg", "node-exporter", "legacy"):
        assert name not in by_name
        assert f'# name = "{name}"' in text
    assert '# dsn = "postgresql://monitor@10.0.0.5:5432/postgres"' in text
    assert '# kind = "prometheus"' in text
    sinks = tomllib.loads(text)["sinks"]
    assert sinks == [{"type": "jsonfile", "path": "measurements.ndjson"}]
    assert "edit this one" in text


def test_sources_output_passes_check(tmp_path: Path) -> None:
    out = tmp_path / "sources.toml"
    proc = reaper("import-pgwatch", "sources", str(SOURCES), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"{out}: written: 9 sources, 1 placeholder sink, 3 sources commented out; 22 notes above")
    check(out, env=ENV)
    # without the variable the dsn comes from, `reaper check` says so
    environ = {k: v for k, v in os.environ.items() if k != "REAPER_T_DSN"}
    bad = subprocess.run([*REAPER, "check", "--config", str(out)], capture_output=True, text=True, timeout=60,
                         env=environ)
    assert bad.returncode == 1
    assert "sources[6].dsn: environment variable REAPER_T_DSN is not set" in bad.stderr


def test_sources_yaml_12_booleans_and_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "sources.yaml"
    path.write_text("- name: a\n  conn_str: postgresql://u@h/db\n  is_enabled: true\n"
                    "  custom_tags: {ssl: on, backup: no}\n  group: one\n  group: two\n")
    result = import_sources(path)
    doc = tomllib.loads(result.text)
    # as in pgwatch (Go's yaml.v3), only true/false are booleans: `on` and `no` stay text
    assert doc["sources"][0]["tags"] == {"ssl": "on", "backup": "no"}
    assert doc["sources"][0]["group"] == "two"
    assert result.notes == (f"{path}: line 6: duplicate key 'group': the last one is used "
                            "(pgwatch refuses a file with duplicate keys)",)


# -------------------------------------------------------------------------------------------------
# metrics.yaml


@pytest.fixture(scope="module")
def metrics_run() -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    proc = reaper("import-pgwatch", "metrics", str(METRICS))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc, tomllib.loads(proc.stdout)


def test_metrics_every_field_mapped(metrics_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, doc = metrics_run
    metrics = doc["metrics"]
    assert metrics["app_queue"] == {
        "description": "Jobs waiting in the application's queue, per queue.",
        "gauges": ["jobs"],
        "node_status": "primary",
        "storage_name": "app_queues",
        "instance_level": True,
        "statement_timeout_seconds": 120,
        "sql": {
            # trailing ';' gone, the -- comment made /* */, the ';' inside the string kept
            "14": "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, /* the time */\n"
                  "  'default;queue'::text as tag_queue,\n  count(*) as jobs\nfrom pg_stat_activity",
            "16": "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, 'default'::text as tag_queue, "
                  "count(*) as jobs, 0 as failed from pg_stat_activity",
        },
    }
    # a PL/Python helper metric keeps its SQL and init_sql
    assert metrics["app_uptime"]["init_sql"].startswith("CREATE EXTENSION IF NOT EXISTS plpython3u;\n")
    assert metrics["app_uptime"]["sql"] == {
        "14": "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, seconds from app_uptime()"}
    assert metrics["app_uptime"]["gauges"] == ["*"]
    # special metrics, and a metric that has only a placeholder comment
    assert metrics["instance_up"] == {"special": True}
    assert metrics["change_events"] == {"special": True}
    assert metrics["app_todo"] == {"description": "Nothing here yet.", "special": True}
    assert metrics["standby_lag"]["node_status"] == "standby"
    assert metrics["bouncer_pools"] == {"source_kinds": ["pgbouncer"], "sql": {"0": "show pools"}}
    assert metrics["odd_keys"] == {"sql": {"15": "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns"}}
    assert "broken" not in metrics


def test_metrics_presets(metrics_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    proc, doc = metrics_run
    assert doc["presets"] == {
        # no_such_metric dropped; broken is written commented out; db_stats is reaper's own
        "app": {"description": "the application's metrics",
                "metrics": {"app_queue": 30, "app_uptime": 60, "db_stats": 60}},
    }
    assert "# [metrics.broken]" in proc.stdout
    assert '# 14 = "update app_jobs set done = true"' in proc.stdout


def test_metrics_report_every_change(metrics_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    proc, _ = metrics_run
    assert notes(proc, METRICS) == [
        "metrics.app_queue.gauges: a column listed twice; listed once",
        "metrics.app_queue.sqls.14: trailing semicolon removed (reaper embeds the query in a larger statement)",
        "metrics.app_queue.sqls.14: 1 '--' comment(s) turned into /* */ (reaper embeds the query in a larger "
        "statement)",
        "metrics.instance_up: a special metric that reaper collects with its own code: written as special = true; "
        "its SQL is not used and is dropped",
        "metrics.change_events: a special metric that reaper collects with its own code: written as special = true",
        "metrics.app_todo.sqls.14: only comments, no query; dropped (pgwatch skips it too)",
        "metrics.app_todo: has no SQL (pgwatch skips such a metric): written as special = true, which reaper skips "
        "with a warning",
        "metrics.standby_lag.disabled_days: a pgwatch v2 field that pgwatch no longer reads; not supported by "
        "reaper; dropped",
        "metrics.standby_lag.colour: unknown field (pgwatch ignores it too); dropped",
        "metrics.bouncer_pools: its SQL is a SHOW command: written with source_kinds = [\"pgbouncer\"]",
        "metrics.broken: reaper would reject it (sql.14: must be one SELECT or WITH query); written commented out",
        "metrics.odd_keys.sqls.latest: the key is not a PostgreSQL major version number; dropped",
        "presets.app.metrics.db_stats: not defined in this file: reaper's own definition of db_stats is used",
        "presets.app.metrics.no_such_metric: no such metric in this file (pgwatch skips it too); dropped",
        "presets.app.metrics.broken: its definition is written commented out (see above); dropped from the preset",
        "presets.exporter: none of its 2 metrics is defined (names like these are Prometheus metric families for "
        "pgwatch's prometheus kind, which reaper does not collect); preset dropped",
        "metrics: 2 of these metrics have the names of metrics reaper ships (change_events, instance_up); in a "
        "config they replace reaper's own: keep only the ones you changed",
    ]


def test_metrics_output_passes_check(tmp_path: Path) -> None:
    out = tmp_path / "metrics.toml"
    proc = reaper("import-pgwatch", "metrics", str(METRICS), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"{out}: written: 8 metrics, 1 preset, 1 metric commented out; 17 notes above")
    config = tmp_path / "reaper.toml"
    config.write_text('[[sources]]\nname = "app"\ndsn = "postgresql://monitor@db.example.com/app"\n'
                      'preset = "app"\nmetrics = { standby_lag = 60, app_todo = 300 }\n\n'
                      '[[sinks]]\ntype = "jsonfile"\npath = "out.ndjson"\n\n' + out.read_text())
    check(config)


def test_metrics_folder_last_file_wins(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    one = "metrics:\n  m:\n    sqls:\n      14: select 1 as epoch_ns\n"
    (folder / "a.yaml").write_text(one)
    (folder / "b.yml").write_text(one.replace("select 1", "select 2"))
    proc = reaper("import-pgwatch", "metrics", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads(proc.stdout)["metrics"]["m"]["sql"] == {"14": "select 2 as epoch_ns"}
    assert proc.stderr.splitlines() == [
        f"{folder / 'b.yml'}: metrics.m: also defined in {folder / 'a.yaml'}; this one is used "
        "(as in pgwatch, the file read last wins)"]


# -------------------------------------------------------------------------------------------------
# input that cannot be imported: one line, exit 1


@pytest.mark.parametrize(("what", "content", "message"), [
    ("sources", None, "file not found"),
    ("sources", "- name: a\n  conn_str: [unclosed\n",
     "invalid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
    ("sources", "metrics: {}\n", "expected a YAML list of sources (pgwatch's sources.yaml format); this looks "
                                 "like a metrics.yaml: use `reaper import-pgwatch metrics`"),
    ("metrics", "- name: a\n", "this is a list, like a sources.yaml: use `reaper import-pgwatch sources`"),
    ("metrics", "just text\n", "expected a YAML mapping with `metrics:` and `presets:`"),
    ("metrics", b"\xff\xfe", 'UTF-16 text (a Windows editor\'s "Unicode"); save the file as UTF-8'),
    ("metrics", b"metrics:\n  a:\n    description: caf\xe9\n",
     "not UTF-8 text: line 3 has the byte 0xe9 (invalid continuation byte); save the file as UTF-8"),
])
def test_unreadable_input(tmp_path: Path, what: str, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "in.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    proc = reaper("import-pgwatch", what, str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"{path}: {message}"]


def test_unwritable_output(tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "dir.toml"
    proc = reaper("import-pgwatch", "metrics", str(METRICS), "--output", str(out))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == f"{out}: cannot write: No such file or directory"
    assert "Traceback" not in proc.stderr


# -------------------------------------------------------------------------------------------------
# the pieces


@pytest.mark.parametrize(("sql", "text", "semicolons", "comments", "statements"), [
    ("select 1;", "select 1", 1, 0, 1),
    ("  select 1 ;; \n", "select 1", 2, 0, 1),
    ("select 1; -- done", "select 1 /* done */", 1, 1, 1),
    ("select ';' as s, $$ -- ; $$ as d, E'\\';' as e", "select ';' as s, $$ -- ; $$ as d, E'\\';' as e", 0, 0, 1),
    ("select 1 /* a -- b; /* nested */ */", "select 1 /* a -- b; /* nested */ */", 0, 0, 1),
    ("select 1 -- a */ b\nfrom t", "select 1 /* a * / b */\nfrom t", 0, 1, 1),
    ("select \"a;b\" from t; select 2", "select \"a;b\" from t; select 2", 0, 0, 2),
    ("/* only a comment */", "/* only a comment */", 0, 0, 1),
])
def test_clean_sql(sql: str, text: str, semicolons: int, comments: int, statements: int) -> None:
    cleaned = clean_sql(sql)
    assert (cleaned.text, cleaned.semicolons, cleaned.line_comments, cleaned.statements) == (
        text, semicolons, comments, statements)


def test_clean_sql_empty_and_first_word() -> None:
    assert clean_sql("/* placeholder */ ;").empty
    assert clean_sql("").empty
    assert clean_sql("SHOW pools").first_word == "show"
    assert clean_sql("/* x */ with a as (select 1) select * from a").first_word == "with"


@pytest.mark.parametrize(("conninfo", "uri"), [
    ("host=h dbname=d user=u", "postgresql://u@h/d"),
    ("host = h port = 5433 dbname = d", "postgresql://h:5433/d"),
    ("host=h1,h2 port=5432,5433 dbname=d target_session_attrs=read-write",
     "postgresql://h1:5432,h2:5433/d?target_session_attrs=read-write"),
    ("host=::1 user=u password=p@ss", "postgresql://u:p%40ss@[::1]/"),
    ("hostaddr=10.0.0.1 dbname=d options='-c statement_timeout=5s'",
     "postgresql:///d?hostaddr=10.0.0.1&options=-c%20statement_timeout%3D5s"),
    ("dbname=d host=/tmp", "postgresql:///d?host=/tmp"),
])
def test_keyword_dsn_to_uri(conninfo: str, uri: str) -> None:
    assert keyword_dsn_to_uri(parse_keyword_dsn(conninfo)) == uri


@pytest.mark.parametrize("bad", ["host", "host=h dbname='open", "=x", ""])
def test_parse_keyword_dsn_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_keyword_dsn(bad)


@pytest.mark.pg
def test_variables_in_every_field_imported_checked_and_found_by_their_expanded_name(
        pg15: ServerHandle, fresh_db: str, tmp_path: Path) -> None:
    """Issue 13: a sources.yaml in the style of pgwatch's sample (variables in name, group, kind, preset and
    conn_str; a literal `$` in a pattern), imported, passes `check` with its variables set, and `once
    --source <expanded name>` collects from the server the variables point at."""
    yaml = tmp_path / "sources.yaml"
    yaml.write_text("- name: ${T_SRC_NAME}\n  conn_str: $T_SRC_DSN\n  kind: $T_SRC_KIND\n"
                    "  preset_metrics: ${T_SRC_PRESET}\n  group: $T_SRC_GROUP\n  is_enabled: true\n"
                    "  custom_tags: {price: \"5$US\", env: dev}\n")
    out = tmp_path / "reaper.toml"
    proc = reaper("import-pgwatch", "sources", str(yaml), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    config = out.read_text().replace('path = "measurements.ndjson"', f'path = "{tmp_path / "m.ndjson"}"')
    out.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n' + config)
    env = {"T_SRC_NAME": "sample-db", "T_SRC_DSN": pg15.dsn(dbname=fresh_db), "T_SRC_KIND": "postgres",
           "T_SRC_PRESET": "basic", "T_SRC_GROUP": "samples"}
    check(out, env=env)
    once = reaper("once", "--config", str(out), "--source", "sample-db", "--metric", "db_stats", env=env)
    assert once.returncode == 0, once.stderr
    assert "sample-db" in once.stdout and "db_stats" in once.stdout, once.stdout
    # the literal `$` of the tag value survives (pgwatch does not expand inside a value that does not start with $)
    from reaper.config.load import load_config

    [source] = load_config(out, environ={**os.environ, **env}).sources
    assert (source.name, source.group, source.tags) == ("sample-db", "samples", {"price": "5$US", "env": "dev"})
