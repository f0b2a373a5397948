"""Lint over every shipped metric definition and preset (fast: no server).

The SQL rules (README "Adding a metric", design.md section 2): a postgres-kind query is one SELECT or
WITH statement without any `;`, it returns an `epoch_ns` column, it writes nothing, and its comments
are /* */ only (the query is embedded in the tick's combined statement, where a `--` comment would
swallow the rest of the line). Every metric has a description and a column list that starts with
epoch_ns; gauges name real, non-tag columns; storage names point somewhere sensible; presets name
defined metrics with positive intervals. Each test is parametrized per metric or preset, so a failure
names it.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reaper.catalog.definitions import check_metric
from reaper.catalog.metrics import SPECIAL_METRICS, load_shipped_definitions
from reaper.catalog.sqllint import write_problems
from reaper.catalog.sqltext import code_of
from reaper.config.load import load_config
from reaper.config.schema import MetricDef
from reaper.errors import ConfigError
from reaper.special import special_spec
from reaper.special.registry import REGISTRY

DEFS = load_shipped_definitions()
METRICS = DEFS.metrics
PRESETS = DEFS.presets
SQL_CASES = [(name, version) for name in sorted(METRICS) for version in sorted(METRICS[name].sql)]

# Output in JSON instead of native types (the sinks get asyncpg's native values).
JSON_RE = re.compile(r"::\s*jsonb?\b|\b(to_jsonb?|row_to_json|jsonb?_agg|jsonb?_build_\w+|jsonb?_object\w*)\s*\(",
                     re.IGNORECASE)
EPOCH_NS_RE = re.compile(r'\bepoch_ns\b|"epoch_ns"')
FIRST_WORD_RE = re.compile(r"\s*(\w+)")
IDENT_RE = re.compile(r"[a-z_][a-z0-9_]*")


def sql_problems(metric: MetricDef, sql: str) -> list[str]:
    """Everything wrong with one SQL text of a metric."""
    scanned = code_of(sql)
    problems = list(scanned.problems)
    code = scanned.text
    postgres = "postgres" in metric.source_kinds
    if ";" in code:
        problems.append("contains ';' (one statement only, and no trailing semicolon)")
    if scanned.line_comments:
        problems.append("has a -- comment (use /* */: the query is embedded in one combined statement)")
    first = FIRST_WORD_RE.match(code)
    first_word = first.group(1).lower() if first else ""
    if postgres:
        if first_word not in ("select", "with"):
            problems.append(f"must be one SELECT or WITH query, starts with {first_word or 'nothing'!r}")
        if not EPOCH_NS_RE.search(sql):
            problems.append("has no epoch_ns output column")
        problems.extend(write_problems(sql))  # the same rule `reaper check` applies
        if JSON_RE.search(code):
            problems.append("returns JSON (values must keep native types)")
    elif first_word not in ("show", "select"):
        problems.append(f"a {'/'.join(metric.source_kinds)} metric must be one SHOW or SELECT command, "
                        f"starts with {first_word or 'nothing'!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# the lexer itself


def test_code_of_blanks_comments_literals_and_identifiers() -> None:
    s = code_of("select 'a;b''c' as x, e'it\\'s;' y, $q$drop;$q$ z, \"odd;\"\"name\" /* c; /* nested */ */ from t")
    assert ";" not in s.text
    assert "drop" not in s.text
    assert s.line_comments == 0 and not s.problems
    assert code_of("select 1 -- note\nfrom t").line_comments == 1
    assert code_of("select 'open").problems == ("unterminated string literal",)
    assert code_of("select $1, a$b from t").text == "select $1, a$b from t"  # parameters, not dollar quotes


def test_sql_problems_catch_each_rule() -> None:
    m = MetricDef(name="x", description="x", columns=("epoch_ns",))
    ok = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, 'insert; drop' as tag_note /* update */"
    assert sql_problems(m, ok) == []
    assert any("';'" in p for p in sql_problems(m, "select 1 as epoch_ns;"))
    assert any("';'" in p for p in sql_problems(m, "select 1 as epoch_ns; select 2"))
    assert any("SELECT or WITH" in p for p in sql_problems(m, "show server_version"))
    assert any("epoch_ns" in p for p in sql_problems(m, "select 1 as x"))
    assert any("writes" in p for p in sql_problems(m, "with d as (delete from t returning 1) select 1 as epoch_ns"))
    assert any("writes" in p for p in sql_problems(m, "select 1 as epoch_ns into t"))
    assert any("writes" in p for p in sql_problems(m, "select 1 as epoch_ns from t for update"))
    assert any("side effects" in p for p in sql_problems(m, "select 1 as epoch_ns, pg_stat_reset()"))
    assert any("-- comment" in p for p in sql_problems(m, "select 1 as epoch_ns -- trailing"))
    assert any("JSON" in p for p in sql_problems(m, "select 1 as epoch_ns, row_to_json(t) from t"))
    assert sql_problems(m, "select 1 as epoch_ns, tup_updated, n_tup_del, pg_settings.setting from pg_settings") == []


# ---------------------------------------------------------------------------------------------
# the shipped catalogue


def test_catalogue_is_not_empty() -> None:
    assert METRICS and PRESETS


def test_the_shipped_definitions_pass_every_check_the_daemon_skips_for_them() -> None:
    """load_shipped_definitions() does not lint the shipped SQL at every start (check_sql=False): this is
    where it is linted, with every check a config's own metric gets (ConfigError on any problem)."""
    from reaper.catalog.metrics import load_definition_dir, presets_dir

    checked = load_definition_dir(presets_dir(), check_sql=True)
    assert checked == DEFS


@pytest.mark.parametrize(("name", "version"), SQL_CASES, ids=[f"{n}-{v}" for n, v in SQL_CASES])
def test_sql(name: str, version: int) -> None:
    metric = METRICS[name]
    problems = sql_problems(metric, metric.sql[version])
    assert not problems, f"metrics.{name}.sql.{version}: " + "; ".join(problems)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_definition(name: str) -> None:
    m = METRICS[name]
    problems: list[str] = []
    if not m.description.strip():
        problems.append("description: required (one line)")
    elif "\n" in m.description.strip():
        problems.append("description: one line only")
    columns = list(m.columns)
    if not columns:
        problems.append("columns: required (every output column, in order)")
    elif "postgres" in m.source_kinds and columns[0] != "epoch_ns":
        problems.append(f"columns: must start with epoch_ns, starts with {columns[0]!r}")
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        problems.append(f"columns: listed more than once: {', '.join(duplicates)}")
    bad_names = [c for c in columns if not IDENT_RE.fullmatch(c)]
    if bad_names:
        problems.append(f"columns: not lower-case identifiers: {', '.join(bad_names)}")
    if "*" in m.gauges:
        if list(m.gauges) != ["*"]:
            problems.append('gauges: "*" must be alone')
    else:
        unknown = [g for g in m.gauges if g not in columns]
        if unknown:
            problems.append(f"gauges: not in columns: {', '.join(unknown)}")
        tags = [g for g in m.gauges if g.startswith("tag_")]
        if tags:
            problems.append(f"gauges: tag columns are labels, never gauges: {', '.join(tags)}")
        if "epoch_ns" in m.gauges:
            problems.append("gauges: epoch_ns is the timestamp, not a gauge")
    if m.sql and columns and "postgres" in m.source_kinds:  # SHOW commands name no columns
        text = " ".join(m.sql.values()).lower()
        unused = [c for c in columns if not re.search(rf"\b{re.escape(c)}\b", text)]
        if unused:
            problems.append(f"columns: returned by no version's SQL: {', '.join(unused)}")
    if m.special and m.sql:
        problems.append("sql: a special metric is collected by reaper itself and has no SQL")
    if not m.special and not m.sql:
        problems.append("sql: required unless special")
    if name in SPECIAL_METRICS and not m.special:
        problems.append("special: reaper collects this metric with its own code (SPECIAL_METRICS); mark it special")
    if m.statement_timeout_seconds is not None and m.statement_timeout_seconds <= 0:
        problems.append("statement_timeout_seconds: must be more than 0")
    assert not problems, f"metrics.{name}: " + "; ".join(problems)


STORING = sorted(name for name, m in METRICS.items() if m.storage_name)


@pytest.mark.parametrize("name", STORING)
def test_storage_name(name: str) -> None:
    """A metric stored under another name lands in a table shaped for it.

    The target is either another metric (whose columns include this one's, with the same tags and the
    same gauge/counter kinds, e.g. db_size_approx -> db_size), or a table name of its own shared by
    several metrics (e.g. reco_* -> recommendations) that agree on the kind of every column they share.
    """
    m = METRICS[name]
    target = m.storage_name
    assert target is not None
    problems: list[str] = []
    if not IDENT_RE.fullmatch(target):
        problems.append(f"storage_name {target!r} is not a lower-case identifier")
    if target == name:
        problems.append("storage_name equals the metric's own name (leave it out)")
    elif target in METRICS:
        other = METRICS[target]
        if other.storage_name:
            problems.append(f"storage_name {target!r} is itself stored as {other.storage_name!r} (no chains)")
        missing = [c for c in m.columns if c not in other.columns]
        if missing:
            problems.append(f"columns not in {target}'s columns: {', '.join(missing)}")
        my_tags = sorted(c for c in m.columns if c.startswith("tag_"))
        their_tags = sorted(c for c in other.columns if c.startswith("tag_"))
        if my_tags != their_tags:
            problems.append(f"tags {my_tags} differ from {target}'s {their_tags} (series would not line up)")
        mixed = [c for c in m.columns if c in other.columns and not c.startswith("tag_") and c != "epoch_ns"
                 and m.is_gauge(c) != other.is_gauge(c)]
        if mixed:
            problems.append(f"gauge in one and counter in the other: {', '.join(mixed)}")
    else:
        for other_name in sorted(n for n, o in METRICS.items() if o.storage_name == target and n != name):
            other = METRICS[other_name]
            mixed = [c for c in m.columns if c in other.columns and not c.startswith("tag_") and c != "epoch_ns"
                     and m.is_gauge(c) != other.is_gauge(c)]
            if mixed:
                problems.append(f"gauge here and counter in {other_name} (also stored as {target!r}), or the "
                                f"other way round: {', '.join(mixed)}")
    assert not problems, f"metrics.{name}.storage_name: " + "; ".join(problems)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset(name: str) -> None:
    preset = PRESETS[name]
    problems: list[str] = []
    if not preset.description.strip():
        problems.append("description: required")
    if not preset.metrics:
        problems.append("metrics: empty")
    for metric, seconds in sorted(preset.metrics.items()):
        if metric not in METRICS:
            problems.append(f"metrics.{metric}: not a defined metric")
        if seconds <= 0:
            problems.append(f"metrics.{metric}: interval must be a positive number of seconds, is {seconds}")
    kinds = {kind for metric in preset.metrics if metric in METRICS for kind in METRICS[metric].source_kinds}
    if len(kinds) > 1:
        problems.append(f"mixes metrics of source kinds {sorted(kinds)}")
    assert not problems, f"presets.{name}: " + "; ".join(problems)


# ---------------------------------------------------------------------------------------------
# the read-only rule that `reaper check`, `run` and a reload apply to every metric (issue 12 item 7)

EPOCH = "(extract(epoch from now()) * 1e9)::int8 as epoch_ns"
SIDE_EFFECT_CALLS = {
    "set_config": "set_config('default_transaction_read_only', 'off', false)",
    "pg_terminate_backend": "pg_terminate_backend(123)",
    "pg_cancel_backend": "pg_cancel_backend(123)",
    "pg_reload_conf": "pg_reload_conf()",
    "pg_rotate_logfile": "pg_rotate_logfile()",
    "nextval": "nextval('s')",
    "setval": "setval('s', 1)",
    "dblink": "x from dblink('dbname=x', 'select 1') as t(x int)",
    "dblink_exec": "dblink_exec('dbname=x', 'insert into t values (1)')",
    "lo_import": "lo_import('/etc/passwd')",
    "lo_unlink": "lo_unlink(1)",
    "pg_advisory_lock": "pg_advisory_lock(1)",
    "pg_advisory_xact_lock_shared": "pg_advisory_xact_lock_shared(1)",
    "pg_try_advisory_lock": "pg_try_advisory_lock(1)",
    "pg_notify": "pg_notify('c', 'p')",
    "pg_switch_wal": "pg_switch_wal()",
    "pg_create_physical_replication_slot": "pg_create_physical_replication_slot('s')",
    "pg_create_restore_point": "pg_create_restore_point('p')",
    "pg_drop_replication_slot": "pg_drop_replication_slot('s')",
    "pg_promote": "pg_promote()",
    "pg_log_backend_memory_contexts": "pg_log_backend_memory_contexts(1)",
    "pg_stat_reset": "pg_stat_reset()",
    "pg_stat_reset_shared": "pg_stat_reset_shared('bgwriter')",
    "pg_stat_statements_reset": "pg_stat_statements_reset()",
    "txid_current": "txid_current()",
    "pg_current_xact_id": "pg_current_xact_id()",
    # these write index or visibility-map pages even in a read-only transaction (tried on PostgreSQL 15)
    "brin_summarize_new_values": "brin_summarize_new_values('i')",
    "brin_summarize_range": "brin_summarize_range('i', 0)",
    "brin_desummarize_range": "brin_desummarize_range('i', 0)",
    "gin_clean_pending_list": "gin_clean_pending_list('i')",
    "pg_truncate_visibility_map": "pg_truncate_visibility_map('t')",
}
WRITES = {
    "insert": "with w as (insert into t values (1) returning 1) select {e}",
    "update": "with w as (update t set x = 1 returning 1) select {e}",
    "delete": "with d as (delete from victim where id = 1 returning 1) select {e}",
    "merge": "select {e} from (select 1) s where false union all select 1 from t merge",
    "copy": "select {e}, x from t copy",
    "create": "with c as (select 1) select {e} from c create",
    "drop": "select {e} /* fine */; drop table t",
    "alter": "select {e}; alter table t add x int",
    "truncate": "select {e}; truncate t",
    "grant": "select {e}; grant all on t to public",
    "lock": "select {e}; lock table t",
    "call": "select {e}; call p()",
    "do": "select {e}; do $$begin end$$",
    "set": "select {e}; set default_transaction_read_only = off",
    "reset": "select {e}; reset all",
    "select ... into": "select {e} into t",
    "for update": "select {e} from t for update",
    "for share": "select {e} from t for share",
}


def metric(sql: str, **fields: object) -> MetricDef:
    return MetricDef(name="m", description="x", columns=("epoch_ns",), sql={0: sql}, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("function", sorted(SIDE_EFFECT_CALLS))
def test_check_metric_rejects_a_function_with_side_effects(function: str) -> None:
    problems = check_metric(metric(f"select {EPOCH}, {SIDE_EFFECT_CALLS[function]}"))
    assert len(problems) == 1, problems
    assert problems[0].startswith("metrics.m.sql.0: calls a function with side effects: ")
    assert function in problems[0]


@pytest.mark.parametrize("word", sorted(WRITES))
def test_check_metric_rejects_a_statement_that_writes(word: str) -> None:
    problems = check_metric(metric(WRITES[word].format(e=EPOCH)))
    assert any(p.startswith("metrics.m.sql.0: writes or changes state: ") and word in p for p in problems), problems


@pytest.mark.parametrize("sql", [
    f'select {EPOCH}, n_tup_del as "delete_cnt", \'drop; nextval(1)\' as tag_note /* set_config() */',
    f"select {EPOCH}, $q$ insert into t $q$ as text, e'it\\'s update' as t2",
    f"select {EPOCH}, pg_sleep(0), pg_read_file('postgresql.conf', 0, 1), txid_current_snapshot()",
    f"select {EPOCH}, stats_reset, pg_stat_get_db_stat_reset_time(1), setting from pg_settings, pg_stat_database",
    f"select {EPOCH}, locktype, mode from pg_locks",
])
def test_check_metric_accepts_reads_that_look_like_writes(sql: str) -> None:
    assert check_metric(metric(sql)) == []


def test_check_metric_sees_a_function_called_by_a_quoted_or_qualified_name() -> None:
    for call in ('pg_catalog."nextval"(\'s\')', "PG_CATALOG.SET_CONFIG('a', 'b', false)", "nextval /* c */ ('s')"):
        problems = check_metric(metric(f"select {EPOCH}, {call}"))
        assert len(problems) == 1 and "side effects" in problems[0], (call, problems)


def test_check_metric_wants_show_or_select_from_a_pooler_metric() -> None:
    assert check_metric(metric("show pools", source_kinds=("pgbouncer",))) == []
    problems = check_metric(metric("reload", source_kinds=("pgbouncer",)))
    assert problems == ["metrics.m.sql.0: a pgbouncer metric must be one SHOW or SELECT command"]


BAD_METRIC_CONFIG = """
[metrics.term]
description = "ends other sessions"
columns = ["epoch_ns", "n"]
sql = {{ 0 = "select {epoch}, count(pg_terminate_backend(pid)) as n from pg_stat_activity" }}

[[sources]]
name = "a"
dsn = "postgresql://u@127.0.0.1/app"
metrics = {{ term = 60 }}

[[sinks]]
type = "jsonfile"
path = "{out}"
"""


def test_load_config_rejects_a_config_metric_with_side_effects(tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(BAD_METRIC_CONFIG.format(epoch=EPOCH, out=tmp_path / "out.ndjson"))
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert e.value.problems == [f"{config}: metrics.term.sql.0: calls a function with side effects: "
                                "pg_terminate_backend (metric SQL must only read)"]


def test_reaper_check_names_the_metric_and_the_function(tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(BAD_METRIC_CONFIG.format(epoch=EPOCH, out=tmp_path / "out.ndjson"))
    proc = subprocess.run([sys.executable, "-m", "reaper.cli", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "metrics.term" in lines[0] and "pg_terminate_backend" in lines[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# the one registry of special metrics (reaper/special/registry.py)


def test_every_shipped_special_metric_is_in_the_registry_and_back() -> None:
    shipped_special = {name for name, m in METRICS.items() if m.special}
    assert shipped_special == set(REGISTRY), "presets/ and reaper/special/registry.py disagree"
    assert {name for name, entry in REGISTRY.items() if entry.collected} == SPECIAL_METRICS
    assert {name for name, entry in REGISTRY.items() if not entry.collected} == set(), "every metric is collected"


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.collector not in (None, "source")))
def test_each_registry_handler_is_an_async_function(name: str) -> None:
    spec = special_spec(name)
    assert spec is not None and inspect.iscoroutinefunction(spec.handler)
    assert (spec.local_only, spec.deadline_seconds) == (REGISTRY[name].local_only, REGISTRY[name].deadline_seconds)


def test_metrics_without_a_collector_have_no_spec() -> None:
    assert special_spec("instance_up") is None  # emitted by the source's own loop, no handler
    assert special_spec("no_such_metric") is None
