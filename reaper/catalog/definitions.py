"""Structuring and checking metric and preset definitions (presets/*.toml, or a config's own tables)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from reaper.catalog.sqllint import write_problems
from reaper.catalog.sqltext import clean_sql, code_of, first_word
from reaper.config.schema import Definitions, MetricDef, PresetDef, _format_cattrs_errors, converter
from reaper.config.topn import definition_problems


def structure_definitions(data: Mapping[str, Any], origin: str, *, check_sql: bool = True
                          ) -> tuple[Definitions, list[str]]:
    """Structure `metrics` and `presets` tables; return them and the problems found. `check_sql=False` skips
    the lint of each metric's SQL text (the shipped definitions: the test suite lints them)."""
    problems: list[str] = []
    metrics: dict[str, MetricDef] = {}
    presets: dict[str, PresetDef] = {}
    raw_metrics = data.get("metrics", {})
    raw_presets = data.get("presets", {})
    if not isinstance(raw_metrics, Mapping):
        problems.append(f"{origin}: metrics: expected a table of metric definitions")
        raw_metrics = {}
    if not isinstance(raw_presets, Mapping):
        problems.append(f"{origin}: presets: expected a table of presets")
        raw_presets = {}
    for name, raw in raw_metrics.items():
        try:
            metric = converter.structure(raw, MetricDef)
        except Exception as e:  # cattrs raises groups of validation errors
            problems.extend(f"{origin}: {line}" for line in _format_cattrs_errors(e, f"metrics.{name}"))
            continue
        metric = attrs.evolve(metric, name=name)
        problems.extend(f"{origin}: {line}" for line in check_metric(metric, check_sql=check_sql))
        metrics[name] = metric
    for name, raw in raw_presets.items():
        try:
            presets[name] = converter.structure(raw, PresetDef)
        except Exception as e:
            problems.extend(f"{origin}: {line}" for line in _format_cattrs_errors(e, f"presets.{name}"))
    return Definitions(metrics=metrics, presets=presets), problems


MAX_TABLE_NAME_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1


def check_metric(metric: MetricDef, *, check_sql: bool = True) -> list[str]:
    """Problems with one metric definition on its own (not its references); `check_sql=False`: not its
    SQL text's."""
    where = f"metrics.{metric.name}"
    problems = []
    size = len(metric.table.encode())
    if size > MAX_TABLE_NAME_BYTES:  # PostgreSQL cuts a longer name: two metrics could share one storage table
        key, fix = (".storage_name", "shorten it") if metric.storage_name else ("", "shorten it, or set storage_name")
        problems.append(f"{where}{key}: {size} bytes; the storage keeps the metric under this name as a PostgreSQL "
                        f"table, whose name holds at most {MAX_TABLE_NAME_BYTES} (a longer one is cut, and two "
                        f"metrics could share one table): {fix}")
    if not metric.special and not metric.sql:
        problems.append(f"{where}.sql: required (a table of minimum major version -> SQL)")
    if metric.special and metric.sql:
        problems.append(f"{where}.sql: a special metric is collected by reaper itself and takes no SQL")
    for version, sql in metric.sql.items():
        if version < 0:
            problems.append(f"{where}.sql.{version}: version must be 0 or more")
        if not check_sql:
            continue
        at = f"{where}.sql.{version}"
        text = sql.strip()
        code = code_of(sql)
        if not text:
            problems.append(f"{at}: empty SQL")
            continue
        problems.extend(f"{at}: {problem}" for problem in code.problems)
        clean = clean_sql(sql)  # (a semicolon followed only by comments is a trailing one too: psql's habit)
        if clean.statements > 1:
            problems.append(f"{at}: more than one statement (a ';' in the middle); one SELECT/WITH query only")
        elif clean.semicolons:
            problems.append(f"{at}: remove the trailing semicolon (one SELECT/WITH query)")
        first = first_word(sql)
        if "postgres" in metric.source_kinds:
            if first not in ("select", "with"):
                problems.append(f"{at}: must be one SELECT or WITH query")
            else:  # (a statement that is no query at all is already named by the line above)
                problems.extend(f"{at}: {problem}" for problem in write_problems(sql))
        elif first not in ("show", "select"):  # pgbouncer/pgpool admin consoles: RELOAD, KILL, SET... act
            problems.append(f"{at}: a {'/'.join(metric.source_kinds)} metric must be one SHOW or SELECT command")
    if metric.statement_timeout_seconds is not None and metric.statement_timeout_seconds <= 0:
        problems.append(f"{where}.statement_timeout_seconds: must be more than 0")
    problems.extend(definition_problems(where, metric.top_n, metric.columns))
    return problems
