"""`check` refuses every value `run` cannot live with, one line each (issue 12 items 3, 5, 13), gives a
"did you mean" for unknown keys at every level (issue 13 item 8), expands the environment in every string
of a source as pgwatch does (issue 13), derives the state dir from the config file (issue 13 items 2, 3)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reaper.config.load import expand_variables, load_config, load_state_dir
from reaper.config.schema import SourceConfig, default_state_dir
from reaper.errors import ConfigError

SRC = '[[sources]]\nname = "a"\ndsn = "postgresql://u@127.0.0.1:5432/db"\n'
SINK = '[[sinks]]\ntype = "jsonfile"\npath = "-"\n'


def problems_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(config, environ=environ or {})
    prefix = f"{config}: "
    assert all(line.startswith(prefix) for line in e.value.problems), e.value.problems
    return [line.removeprefix(prefix) for line in e.value.problems]


# (config text, the one line check must print for it): every input of issue 12 item 5
REFUSED = [
    (SRC + "query_timeout_seconds = inf\n" + SINK,
     "sources[0].query_timeout_seconds: must be a finite number, got inf"),
    (SRC + "query_timeout_seconds = nan\n" + SINK,
     "sources[0].query_timeout_seconds: must be a finite number, got nan"),
    (SRC + "query_timeout_seconds = 1e12\n" + SINK,
     "sources[0].query_timeout_seconds: must be at most 2147483, got 1e+12 "
     "(PostgreSQL's statement_timeout limit, 2147483647 ms)"),
    (SRC + "connect_timeout_seconds = nan\n" + SINK,
     "sources[0].connect_timeout_seconds: must be a finite number, got nan"),
    (SRC + "discovery_interval_seconds = nan\n" + SINK,
     "sources[0].discovery_interval_seconds: must be a finite number, got nan"),
    (SRC + "metrics = { locks = -5 }\n" + SINK,
     "sources[0].metrics.locks: interval must be 0 (disabled) or 1 .. 31622400 seconds, got -5"),
    (SRC + 'password_file = "/nonexistent/pw"\n' + SINK, "sources[0].password_file: /nonexistent/pw: file not found"),
    (SRC + 'password_file = "/tmp"\n' + SINK,
     "sources[0].password_file: /tmp is a directory, expected a file holding the password"),
    (SRC + 'group = ""\n' + SINK, "sources[0].group: a group name must not be empty"),
    ('[[sources]]\nname = "a\\nb"\ndsn = "postgresql://h/db"\n' + SINK,
     "sources[0].name: name must not contain control characters (found \\n)"),
    ('[[sources]]\nname = "a\\u0000"\ndsn = "postgresql://h/db"\n' + SINK,
     "sources[0].name: name must not contain control characters (found \\x00)"),
    (SRC + 'group = "g\\r"\n' + SINK, "sources[0].group: a group name must not contain control characters (found \\r)"),
    (SRC + 'tags = { "k\\n" = "v" }\n' + SINK,
     "sources[0].tags.'k\\n': a tag key must not contain control characters (found \\n)"),
    ('[[sources]]\nname = "a"\ndsn = "postgresql://u:secret@h:54x2/db"\n' + SINK,
     "sources[0].dsn: port '54x2' is not a number from 1 to 65535"),
    ('[[sources]]\nname = "a"\ndsn = "host=h port=5432/db password=secret"\n' + SINK,
     "sources[0].dsn: port '5432/db' is not a number from 1 to 65535"),
    ("[[sources]]\nname = \"a\"\ndsn = \"host=h password='secret\"\n" + SINK,
     "sources[0].dsn: expected a postgresql:// URI or a libpq key=value string (unterminated quoted value of "
     "'password')"),
    ('[[sources]]\nname = "a"\ndsn = "postgresql://h/d\\u0000b"\n' + SINK,
     "sources[0].dsn: a dsn must not contain control characters (found \\x00)"),
    ('[[sources]]\nname = "a"\ndsn = "postgresql://u:p%00w@h/db"\n' + SINK,
     "sources[0].dsn: a dsn must not contain control characters (found \\x00)"),
    ('[[sources]]\nname = "a"\ndsn = "postgresql://h/db?sslmode=requre"\n' + SINK,
     "sources[0].dsn: sslmode 'requre' is not one of disable, allow, prefer, require, verify-ca, verify-full"),
    (SRC + SINK + '[[sinks]]\ntype = "postgres"\ndsn = "host=h sslmode=on"\n',
     "sinks[1].dsn: sslmode 'on' is not one of disable, allow, prefer, require, verify-ca, verify-full"),
    (SRC + SINK + "[collector]\nbatching = 1\n",
     "collector.batching: unknown key (valid keys: cost_window_seconds, create_extensions, http_listen, "
     "instance_cache_max_seconds, max_backoff_seconds, max_interval_factor, max_rows_per_metric, min_db_size_mb, "
     "pause_file, "
     "queue_capacity, server_budget_ms_per_minute, shutdown_grace_seconds, spill_max_bytes, state_dir)"),
    (SRC + SINK + '[collector]\nstate_dir = ""\n',
     "collector.state_dir: must not be empty (leave the key out for the default)"),
    (SRC + SINK + "[collector]\nshutdown_grace_seconds = nan\n",
     "collector.shutdown_grace_seconds: must be a finite number, got nan"),
    (SRC + SINK + "[collector]\nspill_max_bytes = -1\n", "collector.spill_max_bytes: must be 0 or more, got -1"),
    (SRC + SINK + "[collector]\nmin_db_size_mb = -1\n", "collector.min_db_size_mb: must be 0 or more, got -1"),
    (SRC + SINK + "[collector]\nmax_rows_per_metric = 0\n", "collector.max_rows_per_metric: must be 1 or more, got 0"),
    (SRC + SINK + "[collector]\ninstance_cache_max_seconds = -1\n",
     "collector.instance_cache_max_seconds: must be 0 or more, got -1"),
    (SRC + '[[sinks]]\ntype = "jsonfile"\npath = "x"\nmax_bytes = -1\n',
     "sinks[0].max_bytes: must be 1 or more, got -1"),
    (SRC + '[[sinks]]\ntype = "jsonfile"\npath = "x"\nbackups = -1\n', "sinks[0].backups: must be 0 or more, got -1"),
    (SRC + '[[sinks]]\ntype = "jsonfile"\npath = "/tmp"\n',
     "sinks[0].path: /tmp is a directory, expected a file to write"),
    (SRC + '[[sinks]]\ntype = "postgres"\ndsn = "postgresql://h/db"\nbatch_size = 0\n',
     "sinks[0].batch_size: must be 1 or more, got 0"),
    (SRC + '[[sinks]]\ntype = "postgres"\ndsn = "postgresql://h/db"\nretention_days = -1\n',
     "sinks[0].retention_days: must be 0 or more, got -1"),
    (SRC + '[[sinks]]\ntype = "postgres"\ndsn = "postgresql://h/db"\nwrite_timeout_seconds = 0\n',
     "sinks[0].write_timeout_seconds: must be 0.001 or more, got 0"),
    (SRC + '[[sinks]]\ntype = "postgres"\ndsn = "postgresql://h/db"\nbatching_delay_seconds = nan\n',
     "sinks[0].batching_delay_seconds: must be a finite number, got nan"),
    (SRC + '[[sinks]]\ntype = "postgres"\ndsn = "postgresql://h/db"\nbatch_sise = 5\n',
     "sinks[0].batch_sise: unknown key; did you mean 'batch_size'? (valid keys: batch_size, batching_delay_seconds, "
     "connect_timeout_seconds, dsn, maintenance_interval_seconds, name, partition_interval, password_file, "
     "retention_days, type, write_timeout_seconds)"),
    (SRC + '[[sinks]]\ntype = "prometheus"\nlisten = "nonsense"\n',
     "sinks[0].listen: expected host:port (e.g. 127.0.0.1:9187), got 'nonsense'"),
    (SRC + '[[sinks]]\ntype = "prometheus"\nlisten = "127.0.0.1:99999"\n',
     "sinks[0].listen: port 99999 is not a number from 0 to 65535"),
    (SRC + '[[sinks]]\ntype = "prometheus"\nstale_after_seconds = -1\n',
     "sinks[0].stale_after_seconds: must be more than 0, got -1"),
    (SRC + '[[sinks]]\ntype = "prometheus"\nnamespace = "reaper"\n',
     "sinks[0].namespace: 'reaper' would collide with reaper's own reaper_* families; choose another"),
    (SRC + '[[sinks]]\ntype = "prometheus"\nkind = "x"\n', "sinks[0].kind: unknown key (valid keys: listen, name, "
     "namespace, stale_after_seconds, timestamps, type)"),
    (SRC + SINK + '[metrics.""]\nsql = { 14 = "select 1" }\n', "metrics.'': a metric name must not be empty"),
    (SRC + SINK + '[metrics.m]\nsql = { 14 = "select 1" }\nstatement_timeout_seconds = nan\n',
     "metrics.m.statement_timeout_seconds: must be a finite number, got nan"),
    (SRC + SINK + '[metrics.m]\nsqll = { 14 = "select 1" }\nspecial = true\n',
     "metrics.m.sqll: unknown key; did you mean 'sql'? (valid keys: budget_exempt, columns, description, gauges, "
     "heavy, init_sql, instance_level, name, node_status, requires_extension, source_kinds, special, sql, "
     "statement_timeout_seconds, storage_name, top_n)"),
    (SRC + SINK + '[metrics.m]\nsql = { 14 = "select 1 as a\\u0000" }\n',
     "metrics.m.sql.14: SQL must not contain a NUL character (PostgreSQL cannot take one)"),
    # two metrics whose names share their first 63 bytes were stored in one table (PostgreSQL cut both names)
    (SRC + SINK + f'[metrics.{"m" * 64}]\nsql = {{ 14 = "select 1 as a" }}\n',
     f"metrics.{'m' * 64}: 64 bytes; the storage keeps the metric under this name as a PostgreSQL table, whose name "
     "holds at most 63 (a longer one is cut, and two metrics could share one table): shorten it, or set storage_name"),
    (SRC + SINK + f'[metrics.m]\nstorage_name = "{"é" * 32}"\nsql = {{ 14 = "select 1 as a" }}\n',
     "metrics.m.storage_name: 64 bytes; the storage keeps the metric under this name as a PostgreSQL table, whose "
     "name holds at most 63 (a longer one is cut, and two metrics could share one table): shorten it"),
    # psql's habit: a semicolon, then a comment (it was "a ';' in the middle")
    (SRC + SINK + '[metrics.m]\nsql = { 14 = "select 1 as a; -- done" }\n',
     "metrics.m.sql.14: remove the trailing semicolon (one SELECT/WITH query)"),
    (SRC + SINK + '[metrics.m]\nsql = { 14 = "select 1 as a; select 2 as b" }\n',
     "metrics.m.sql.14: more than one statement (a ';' in the middle); one SELECT/WITH query only"),
    (SRC + SINK + '[presets.p]\nmetric = { locks = 60 }\n',
     "presets.p.metric: unknown key; did you mean 'metrics'? (valid keys: description, metrics, top_n)"),
    (SRC + SINK + '[sourcs]\n', "sourcs: unknown key; did you mean 'sources'? (valid keys: collector, fleet, "
     "metrics, presets, sinks, sources, sources_from)"),
    (SRC + 'kind = "postgress"\n' + SINK,
     "sources[0].kind: 'postgress' is not one of: postgres, postgres-discovery, pgbouncer, pgpool, patroni"),
    (SRC + 'presett = "basic"\n' + SINK,
     "sources[0].presett: unknown key; did you mean 'preset'? (valid keys: connect_timeout_seconds, "
     "discovery_interval_seconds, dsn, enabled, exclude_pattern, group, include_pattern, kind, lock_timeout_seconds, "
     "max_interval_factor, "
     "metrics, name, only_if_primary, password_file, pause_when_active_backends_over, preset, query_timeout_seconds, "
     "search_path, server_budget_ms_per_minute, specials, standby_metrics, standby_preset, tags, top_n)"),
]


@pytest.mark.parametrize(("text", "line"), REFUSED, ids=[line.split(":")[0] + f"#{i}"
                                                          for i, (_, line) in enumerate(REFUSED)])
def test_check_refuses_with_one_clear_line(tmp_path: Path, text: str, line: str) -> None:
    assert problems_of(tmp_path, text) == [line]


def test_a_libpq_key_value_dsn_is_taken_as_the_same_uri(tmp_path: Path) -> None:
    """pgwatch and psql take libpq's key=value connection strings; so does a config (as the URI asyncpg takes)."""
    config = tmp_path / "c.toml"
    config.write_text("[[sources]]\nname = \"a\"\ndsn = \"host=db1 port=5433 dbname='my app' user=mon "
                      "password='p w' sslmode=require\"\n"
                      '[[sinks]]\ntype = "postgres"\ndsn = "host=/run/postgresql dbname=metrics"\n')
    loaded = load_config(config, environ={})
    assert loaded.sources[0].dsn == "postgresql://mon:p%20w@db1:5433/my%20app?sslmode=require"
    assert loaded.sinks[0].dsn == "postgresql:///metrics?host=/run/postgresql"


@pytest.mark.parametrize(("pgwatch", "reaper", "dsn"), [
    ("postgres-continuous-discovery", "postgres-discovery", "postgresql://db1/app"),
    ("patroni-continuous-discovery", "patroni", "etcd://etcd1:2379/service/main"),
    ("patroni-namespace-discovery", "patroni", "etcd://etcd1:2379/service")])
def test_pgwatchs_kind_names_are_taken_as_reapers(tmp_path: Path, pgwatch: str, reaper: str, dsn: str) -> None:
    """A pgwatch user writes pgwatch's kind names; they were refused as unknown."""
    config = tmp_path / "c.toml"
    config.write_text(f'[[sources]]\nname = "a"\nkind = "{pgwatch}"\ndsn = "{dsn}"\n'
                      '[[sinks]]\ntype = "jsonfile"\npath = "out.ndjson"\n')
    assert load_config(config, environ={}).sources[0].kind == reaper


def test_empty_prometheus_namespace_is_refused(tmp_path: Path) -> None:
    [line] = problems_of(tmp_path, SRC + '[[sinks]]\ntype = "prometheus"\nnamespace = ""\n')
    assert line.startswith("sinks[0].namespace: expected a Prometheus name prefix")


def test_every_problem_of_one_table_is_reported_at_once(tmp_path: Path) -> None:
    lines = problems_of(tmp_path, SRC + "query_timeout_seconds = nan\nconnect_timeout_seconds = -1\n"
                        'group = ""\n' + SINK)
    assert lines == ["sources[0].group: a group name must not be empty",
                     "sources[0].connect_timeout_seconds: must be more than 0, got -1",
                     "sources[0].query_timeout_seconds: must be a finite number, got nan"]


def test_a_model_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValueError, match="must be a finite number"):
        SourceConfig(name="a", dsn="postgresql://h/db", query_timeout_seconds=float("nan"))


def test_a_password_is_never_echoed_in_a_port_or_variable_problem(tmp_path: Path) -> None:
    lines = problems_of(tmp_path, '[[sources]]\nname = "a"\ndsn = "postgresql://u:pa$sw0rd@h:5432/db"\n' + SINK)
    assert lines == ["sources[0].dsn: an environment variable in the password is not set "
                     "(write $$ for a literal $ in a password)"]
    assert "sw0rd" not in lines[0]


# -- pgwatch's variable semantics ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expanded"), [
    ("$A-${B}", "1-2"), ("$$A", "$A"), ("a$$$A", "a$1"), ("^db_.*$", "^db_.*$"), ("x$", "x$"), ("$1", "$1"),
    ("${A}${A}", "11"), ("$A_x", "$A_x"),
])
def test_expand_variables(text: str, expanded: str) -> None:
    result, missing, unterminated = expand_variables(text, {"A": "1", "B": "2"})
    if text == "$A_x":
        assert missing == ["$A_x"]  # a name runs as far as name characters go, as in a shell
    else:
        assert (result, missing, unterminated) == (expanded, [], False)


def test_every_string_of_a_source_is_expanded(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[sources]]\nname = "$NAME"\ndsn = "postgresql://u:${PW}@h:$PORT/db"\nkind = "${KIND}"\n'
                      'group = "${GROUP}"\npreset = "$PRESET"\ninclude_pattern = "^${PREFIX}_.*$"\n'
                      'tags = { env = "$ENV", literal = "$$HOME" }\n' + SINK)
    env = {"NAME": "db1", "PW": "p$w", "PORT": "5433", "KIND": "postgres-discovery", "GROUP": "g1",
           "PRESET": "basic", "PREFIX": "app", "ENV": "prod"}
    [src] = load_config(config, environ=env).sources
    assert (src.name, src.dsn, src.kind, src.group, src.preset, src.include_pattern, src.tags) == (
        "db1", "postgresql://u:p$w@h:5433/db", "postgres-discovery", "g1", "basic", "^app_.*$",
        {"env": "prod", "literal": "$HOME"})


def test_an_unset_variable_is_one_line_naming_the_field(tmp_path: Path) -> None:
    lines = problems_of(tmp_path, '[[sources]]\nname = "${NO_NAME}"\ndsn = "postgresql://h/db"\n'
                        'tags = { env = "$NO_ENV" }\n' + SINK)
    assert lines == ["sources[0].name: environment variable NO_NAME is not set",
                     "sources[0].tags.env: environment variable NO_ENV is not set (write $$ for a literal $)"]


# -- the state dir ---------------------------------------------------------------------------------


def test_default_state_dir_is_per_config_file(tmp_path: Path) -> None:
    config = tmp_path / "prod.toml"
    digest = hashlib.sha256(str(config).encode()).hexdigest()[:8]
    xdg = tmp_path / "xdg"
    got = default_state_dir(config, {"XDG_STATE_HOME": str(xdg)})
    if os.geteuid() == 0:
        assert got == f"/var/lib/reaper/prod-{digest}"
    else:
        assert got == f"{xdg}/reaper/prod-{digest}"
    assert default_state_dir(tmp_path / "other.toml", {}) != default_state_dir(config, {})
    assert default_state_dir(config, {"STATE_DIRECTORY": "/run/x:/run/y"}) == "/run/x"


def test_load_config_fills_in_the_default_state_dir(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SRC + SINK)
    env = {"STATE_DIRECTORY": str(tmp_path / "sd")}
    assert load_config(config, environ=env).collector.state_dir == str(tmp_path / "sd")


def test_state_dir_is_found_without_the_sources_secrets(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "st"}"\n'
                      '[[sources]]\nname = "a"\ndsn = "postgresql://u:${REAPER_PW_UNSET}@h/db"\n' + SINK)
    assert load_state_dir(config, environ={}) == tmp_path / "st"
    config.write_text('[[sources]]\nname = "a"\ndsn = "postgresql://u:${REAPER_PW_UNSET}@h/db"\n' + SINK)
    assert load_state_dir(config, environ={"STATE_DIRECTORY": "/run/r"}) == Path("/run/r")
    config.write_text('[collector]\nstate_dir = ""\n')
    with pytest.raises(ConfigError, match=r"collector\.state_dir: must not be empty"):
        load_state_dir(config, environ={})


def test_run_refuses_a_config_check_refuses_with_the_same_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "st"}"\n' + SRC + "query_timeout_seconds = nan\n" + SINK)
    line = f"{config}: sources[0].query_timeout_seconds: must be a finite number, got nan"
    for verb in ("check", "run"):
        proc = subprocess.run([sys.executable, "-m", "reaper.cli", verb, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert line in proc.stderr.splitlines(), proc.stderr
        assert "Traceback" not in proc.stderr


def check_lines(tmp_path: Path, text: str) -> list[str]:
    """What `reaper check` prints for a config, as the operator sees it (one line per problem, the file cut)."""
    config = tmp_path / "c.toml"
    config.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "reaper.cli", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    return [line.removeprefix(f"{config}: ") for line in proc.stderr.splitlines()]


def test_a_table_with_a_wrong_value_still_has_its_other_problems_named_in_the_same_check(tmp_path: Path) -> None:
    """A wrong value in a source, a sink or [collector] left the rest of that table unchecked: a second
    `check` (after the first fix) named the next mistakes. Every problem is named in one check."""
    lines = check_lines(tmp_path, SRC + 'preset = "basik"\nmetrics = { db_stats = "30", no_such_metric = 60 }\n'
                        'connect_timeout_seconds = -1\n'
                        + SRC + SINK + '[[sinks]]\ntype = "jsonfile"\npath = "-"\nfile_mode = "rw"\n'
                        f'[collector]\nqueue_capacity = "many"\nstate_dir = "{tmp_path / "c.toml"}"\n')
    starts = ["sources[0].metrics.db_stats: expected a whole number, got '30'",
              "sources[0].connect_timeout_seconds: must be more than 0, got -1",
              "sources[0].preset: unknown preset 'basik' (known: ",
              "sources[0].metrics.no_such_metric: unknown metric",
              "sources[1].name: duplicate source name 'a' (also sources[0])",
              "sinks[1].file_mode: ",
              "sinks[1]: duplicate sink ",
              "collector.queue_capacity: ",
              f"collector.state_dir: {tmp_path / 'c.toml'} exists and is not a directory"]
    assert len(lines) == len(starts), lines
    for start in starts:
        assert any(line.startswith(start) for line in lines), (start, lines)


def test_problems_that_show_one_after_the_other_in_one_table_are_named_in_the_same_check(tmp_path: Path) -> None:
    """A value's type is checked before another value's range, and a table whose dsn was wrong stood in for
    nothing: a second and a third `check` (after each fix) named the next mistakes (a negative interval beside
    a fractional one, an unknown preset, a duplicate name behind a bad port). One check names them all."""
    lines = check_lines(tmp_path, SRC + 'preset = "basix"\nmetrics = { locks = 1.5, wal = -1, db_statz = 60 }\n'
                        '[[sources]]\nname = "a"\ndsn = "postgresql://u@h:99999/db"\nstandby_preset = "nope"\n' + SINK)
    starts = ["sources[0].metrics.locks: expected a whole number, got 1.5",
              "sources[0].metrics.wal: interval must be 0 (disabled) or 1 ",
              "sources[0].preset: unknown preset 'basix' (known: ",
              "sources[0].metrics.db_statz: unknown metric",
              "sources[1].dsn: port '99999' is not a number",
              "sources[1].name: duplicate source name 'a' (also sources[0])",
              "sources[1].standby_preset: unknown preset 'nope' (known: "]
    assert len(lines) == len(starts), lines
    for start in starts:
        assert any(line.startswith(start) for line in lines), (start, lines)


@pytest.mark.parametrize("kind", ["postgres", "postgres-discovery", "patroni", "pgbouncer", "pgpool"])
def test_a_bad_dsn_is_one_line_whatever_the_kind(tmp_path: Path, kind: str) -> None:
    """(The rest of the source is checked on a stand-in dsn, which must never be the subject of a line.)"""
    lines = check_lines(tmp_path, f'[[sources]]\nname = "a"\nkind = "{kind}"\n'
                        'dsn = "postgresql://u@h:99999/db"\n' + SINK)
    assert len(lines) == 1 and lines[0].startswith("sources[0].dsn: port '99999' is not a number"), lines


def test_a_definition_that_does_not_structure_is_not_called_unknown_where_it_is_used(tmp_path: Path) -> None:
    """A config's own metric or preset with a mistake was named twice: by its own line and as "unknown" by
    every source using it, which sent the operator looking for a missing definition."""
    lines = check_lines(tmp_path, '[metrics.mine]\nsql = { 11 = "select 1 as x" }\ngauges = 5\n'
                        '[presets.p]\nmetrics = { mine = "often" }\n'
                        + SRC + 'preset = "p"\nmetrics = { mine = 30 }\ntop_n = { mine = { n = 5 } }\n' + SINK)
    assert len(lines) == 2, lines
    assert lines[0].startswith("metrics.mine.gauges: ") and lines[1].startswith("presets.p.metrics.mine: "), lines
    assert not any("unknown" in line for line in lines), lines


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows editors start UTF-8 files with a byte order mark, which TOML's parser refused as
    "Invalid statement (at line 1, column 1)": `check` now reads such a file like any other."""
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xef\xbb\xbf" + (SRC + SINK).encode())
    proc = subprocess.run([sys.executable, "-m", "reaper.cli", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_sinks_that_would_write_one_file_or_listen_on_one_port_are_refused_whatever_their_names(
        tmp_path: Path) -> None:
    """Two jsonfile sinks with names of their own and one file spelt two ways (or through a symlink) were
    both started: two writers, each rotating the file under the other; two Prometheus sinks on one port:
    the second retried its listen for ever. One line each; distinct addresses on one port are fine."""
    (tmp_path / "out.ndjson").touch()
    (tmp_path / "link.ndjson").symlink_to(tmp_path / "out.ndjson")

    def jsonfile(name: str, path: str) -> str:
        return f'[[sinks]]\ntype = "jsonfile"\nname = "{name}"\npath = "{path}"\n'

    def prometheus(name: str, listen: str) -> str:
        return f'[[sinks]]\ntype = "prometheus"\nname = "{name}"\nlisten = "{listen}"\n'

    lines = check_lines(tmp_path, SRC + jsonfile("main", str(tmp_path / "out.ndjson"))
                        + jsonfile("copy", "sub/../out.ndjson") + jsonfile("linked", "link.ndjson")
                        + jsonfile("own", "other.ndjson")
                        + jsonfile("screen", "-") + jsonfile("screen2", "-")
                        + prometheus("p1", ":9300") + prometheus("p2", "127.0.0.1:9300")
                        + prometheus("p3", "0.0.0.0:9301") + prometheus("p4", "127.0.0.1:9302")
                        + prometheus("p5", "127.0.0.2:9302")
                        + '[collector]\nhttp_listen = "127.0.0.1:9301"\n')
    target = os.path.realpath(tmp_path / "out.ndjson")
    assert lines == [
        f"sinks[1].path: the file {target} is written by sinks[0] already (two writers of one file lose lines; "
        "give each sink its own file)",
        f"sinks[2].path: the file {target} is written by sinks[0] already (two writers of one file lose lines; "
        "give each sink its own file)",
        "sinks[5].path: standard output is written by sinks[4] already (two writers of one file lose lines; "
        "give each sink its own file)",
        "sinks[7].listen: 127.0.0.1:9300 takes the port sinks[6] listens on already (only one of them could open; "
        "give each its own port)",
        "sinks[8].listen: 0.0.0.0:9301 takes the port collector.http_listen listens on already (only one of them "
        "could open; give each its own port)"], lines


@pytest.mark.parametrize("userinfo", ["u:Secr/et", "u:Sec?ret", "u:Se#cret", "u:12/34"])
def test_a_password_with_a_uri_delimiter_is_one_line_that_shows_no_part_of_it(tmp_path: Path, userinfo: str) -> None:
    """`postgresql://u:Secr/et@host/db`: the URI's user part ends at the '/', so "u:Secr" was read as host u,
    port 'Secr': check said "port 'Secr' is not a number", the password's start in the message (and a log),
    or, with a number before the '/', ok, and the source went down at every connect naming host "u"."""
    dsn = f"postgresql://{userinfo}@127.0.0.1:5432/db"
    lines = check_lines(tmp_path, SRC.replace("postgresql://u@127.0.0.1:5432/db", dsn) + SINK)
    assert len(lines) == 1 and lines[0].startswith("sources[0].dsn: the part before '@' holds a '/', '?' or '#'")
    secret = userinfo.partition(":")[2]
    assert not any(part in lines[0] for part in re.split(r"[/?#]", secret)), lines


def test_an_at_sign_in_a_dsns_query_or_password_is_no_delimiter_problem(tmp_path: Path) -> None:
    for dsn in ("postgresql://127.0.0.1/db?user=app@azure-server", "postgresql://u:p@w@127.0.0.1/db",
                "postgresql://u:Secr%2Fet@127.0.0.1/db"):
        config = tmp_path / "c.toml"
        config.write_text(SRC.replace("postgresql://u@127.0.0.1:5432/db", dsn) + SINK)
        assert load_config(config, environ={}).sources[0].dsn == dsn


def test_a_path_starting_with_a_tilde_is_in_the_home_directory_for_run_and_status(tmp_path: Path) -> None:
    """`state_dir = "~/state"`, `path = "~/out/m.ndjson"`: reaper made a folder named "~" in its working
    directory (under systemd: /~) and `reaper status` looked in its own working directory's."""
    from test_daemon import wait_until

    home, cwd = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    cwd.mkdir()
    config = tmp_path / "reaper.toml"
    config.write_text('[collector]\nstate_dir = "~/state"\n'
                      '[[sources]]\nname = "a"\ndsn = "postgresql://u@127.0.0.1:1/db"\nconnect_timeout_seconds = 1\n'
                      '[[sinks]]\ntype = "jsonfile"\npath = "~/out/m.ndjson"\n')
    env = {**os.environ, "HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "reaper.cli", "run", "--config", str(config)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (home / "state" / "status.json").exists() or proc.poll() is not None,
                   what="the status file under the home directory")
        status = subprocess.run([sys.executable, "-m", "reaper.cli", "status", "--config", str(config)], cwd=cwd,
                                env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "source\ta\t" in status.stdout, status.stderr
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not list(cwd.iterdir()), list(cwd.iterdir())


def test_a_certificate_file_the_dsn_names_must_exist(tmp_path: Path) -> None:
    """`sslrootcert=/etc/ssl/ours/ca.crt` misspelt: every connect failed with "No such file or directory", which
    names no file, and `check` said ok. Relative paths are libpq's (the daemon's working directory): not judged."""
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    dsn = (f"postgresql://u@127.0.0.1:5432/db?sslmode=verify-full&sslrootcert={tmp_path / 'ca.crt'}"
           f"&sslcert={tmp_path / 'client.crt'}&sslkey={tmp_path}&sslcrl=relative.crl")
    sink = f'[[sinks]]\ntype = "postgres"\ndsn = "postgresql://u@127.0.0.1/m?sslrootcert={tmp_path / "none.crt"}"\n'
    lines = check_lines(tmp_path, SRC.replace("postgresql://u@127.0.0.1:5432/db", dsn) + sink)
    assert lines == [f"sources[0].dsn: sslcert {tmp_path / 'client.crt'}: file not found",
                     f"sources[0].dsn: sslkey {tmp_path}: a directory, expected a file",
                     f"sinks[0].dsn: sslrootcert {tmp_path / 'none.crt'}: file not found"], lines
    ok = tmp_path / "ok.toml"  # libpq 16's "use the system's CA store" is no file
    ok.write_text(SRC.replace("postgresql://u@127.0.0.1:5432/db", "postgresql://u@127.0.0.1/db?sslrootcert=system")
                  + SINK)
    assert load_config(ok, environ={}).sources[0].dsn.endswith("sslrootcert=system")
