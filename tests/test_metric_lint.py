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

import re

import attrs
import pytest

from reaper.catalog.metrics import SPECIAL_METRICS, load_shipped_definitions
from reaper.config.schema import MetricDef

DEFS = load_shipped_definitions()
METRICS = DEFS.metrics
PRESETS = DEFS.presets
SQL_CASES = [(name, version) for name in sorted(METRICS) for version in sorted(METRICS[name].sql)]

# Statements that write, change settings or hold more than they read. As whole words outside
# comments, string literals and quoted identifiers.
WRITE_WORDS = ("insert", "update", "delete", "merge", "create", "drop", "alter", "truncate", "grant",
               "revoke", "copy", "set", "reset", "vacuum", "analyze", "analyse", "cluster", "reindex",
               "refresh", "lock", "call", "do", "notify", "listen", "prepare", "execute", "discard",
               "comment", "security", "into")
WRITE_RE = re.compile(r"\b(" + "|".join(WRITE_WORDS) + r")\b", re.IGNORECASE)
LOCKING_RE = re.compile(r"\bfor\s+(update|no\s+key\s+update|share|key\s+share)\b", re.IGNORECASE)
# Functions with side effects on the monitored server (resetting statistics, changing settings,
# signalling or ending backends, consuming transaction ids, WAL switches, slots, sequences).
SIDE_EFFECT_FUNCTIONS_RE = re.compile(
    r"\b(pg_stat_reset\w*|pg_stat_statements_reset|set_config|nextval|setval|pg_terminate_backend|"
    r"pg_cancel_backend|pg_reload_conf|pg_rotate_logfile|pg_switch_wal|pg_create_\w*slot|"
    r"pg_drop_replication_slot|pg_replication_slot_advance|pg_advisory_\w*|txid_current|pg_current_xact_id|"
    r"pg_promote|pg_wal_replay_(pause|resume)|pg_log_backend_memory_contexts|lo_\w+|dblink\w*|"
    r"pg_file_write|pg_backup_start|pg_backup_stop|pg_start_backup|pg_stop_backup)\s*\(",
    re.IGNORECASE)
# Output in JSON instead of native types (the sinks get asyncpg's native values).
JSON_RE = re.compile(r"::\s*jsonb?\b|\b(to_jsonb?|row_to_json|jsonb?_agg|jsonb?_build_\w+|jsonb?_object\w*)\s*\(",
                     re.IGNORECASE)
EPOCH_NS_RE = re.compile(r'\bepoch_ns\b|"epoch_ns"')
FIRST_WORD_RE = re.compile(r"\s*(\w+)")
IDENT_RE = re.compile(r"[a-z_][a-z0-9_]*")
DOLLAR_TAG_RE = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")


@attrs.frozen
class Scanned:
    """SQL with comments, string literals and quoted identifiers blanked out."""

    code: str  # literals -> '', quoted identifiers -> "", comments -> one space
    dash_comments: int  # `--` comments seen
    problems: tuple[str, ...]  # unterminated literals or comments


def scan_sql(sql: str) -> Scanned:
    """A small SQL lexer: enough to tell code from comments, literals and quoted identifiers."""
    out: list[str] = []
    problems: list[str] = []
    dash = 0
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        two = sql[i:i + 2]
        if two == "--":
            dash += 1
            end = sql.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
        elif two == "/*":
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                problems.append("unterminated /* comment")
            i = j
            out.append(" ")
        elif c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            j = i + 1
            while j < n:
                if escapes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == "'":
                    if sql.startswith("''", j):
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                problems.append("unterminated string literal")
            i = j + 1
            out.append("''")
        elif c == '"':
            j = i + 1
            while j < n:
                if sql[j] == '"':
                    if sql.startswith('""', j):
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                problems.append("unterminated quoted identifier")
            i = j + 1
            out.append('""')
        elif c == "$" and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] in "_$")) and (
                m := DOLLAR_TAG_RE.match(sql, i)):
            tag = m.group(0)
            end = sql.find(tag, m.end())
            if end < 0:
                problems.append(f"unterminated {tag} quote")
                i = n
            else:
                i = end + len(tag)
            out.append("''")
        else:
            out.append(c)
            i += 1
    return Scanned(code="".join(out), dash_comments=dash, problems=tuple(problems))


def sql_problems(metric: MetricDef, sql: str) -> list[str]:
    """Everything wrong with one SQL text of a metric."""
    scanned = scan_sql(sql)
    problems = list(scanned.problems)
    code = scanned.code
    postgres = "postgres" in metric.source_kinds
    if ";" in code:
        problems.append("contains ';' (one statement only, and no trailing semicolon)")
    if scanned.dash_comments:
        problems.append("has a -- comment (use /* */: the query is embedded in one combined statement)")
    first = FIRST_WORD_RE.match(code)
    first_word = first.group(1).lower() if first else ""
    if postgres:
        if first_word not in ("select", "with"):
            problems.append(f"must be one SELECT or WITH query, starts with {first_word or 'nothing'!r}")
        if not EPOCH_NS_RE.search(sql):
            problems.append("has no epoch_ns output column")
        writes = sorted({m.group(1).lower() for m in WRITE_RE.finditer(code)}
                        | {"for " + " ".join(m.group(1).lower().split()) for m in LOCKING_RE.finditer(code)})
        if writes:
            problems.append(f"writes or changes state: {', '.join(writes)} (outside comments and literals)")
        side_effects = sorted({m.group(1).lower() for m in SIDE_EFFECT_FUNCTIONS_RE.finditer(code)})
        if side_effects:
            problems.append(f"calls functions with side effects: {', '.join(side_effects)}")
        if JSON_RE.search(code):
            problems.append("returns JSON (values must keep native types)")
    elif first_word not in ("show", "select"):
        problems.append(f"a {'/'.join(metric.source_kinds)} metric must be one SHOW or SELECT command, "
                        f"starts with {first_word or 'nothing'!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# the lexer itself


def test_scan_sql_blanks_comments_literals_and_identifiers() -> None:
    s = scan_sql("select 'a;b''c' as x, e'it\\'s;' y, $q$drop;$q$ z, \"odd;\"\"name\" /* c; /* nested */ */ from t")
    assert ";" not in s.code
    assert "drop" not in s.code
    assert s.dash_comments == 0 and not s.problems
    assert scan_sql("select 1 -- note\nfrom t").dash_comments == 1
    assert scan_sql("select 'open").problems == ("unterminated string literal",)
    assert scan_sql("select $1, a$b from t").code == "select $1, a$b from t"  # parameters, not dollar quotes


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
