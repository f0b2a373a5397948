"""pgwatch's metrics.yaml (metrics and presets) -> reaper `[metrics.NAME]` and `[presets.NAME]` TOML."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from reaper.catalog.definitions import check_metric
from reaper.catalog.metrics import SPECIAL_METRICS
from reaper.catalog.pgwatch.common import (
    ImportResult,
    Report,
    as_text,
    comment_out,
    count,
    header,
    interval,
    one_line,
    shipped_names,
    yaml_files,
)
from reaper.catalog.pgwatch.yamlread import read_yaml
from reaper.catalog.sqltext import clean_sql
from reaper.config.schema import MetricDef, _format_cattrs_errors, converter
from reaper.errors import ConfigError
from reaper.special.registry import PGWATCH_SPECIAL  # reaper collects them with its own code, never their SQL

# Fields of pgwatch's Metric (internal/metrics/types.go) plus the documented statement_timeout_seconds.
METRIC_FIELDS = ("description", "sqls", "gauges", "node_status", "is_instance_level", "storage_name",
                 "statement_timeout_seconds", "init_sql")
# pgwatch v2 leftovers (MetricAttrs): pgwatch parses none of them.
METRIC_V2_FIELDS = frozenset({"is_private", "disabled_days", "disabled_times",
                              "extension_version_based_overrides"})


def import_metrics(path: str | Path) -> ImportResult:
    """Convert a pgwatch metrics.yaml (or a folder of them) to reaper `[metrics.*]`/`[presets.*]` TOML."""
    path = Path(path)
    report = Report()
    files = yaml_files(path)
    raw_metrics: dict[str, tuple[str, Any]] = {}
    raw_presets: dict[str, tuple[str, Any]] = {}
    for file in files:
        origin = str(file)
        data = read_yaml(file, report)
        if data is None:
            report(origin, "", "empty file: no metrics or presets")
            continue
        if isinstance(data, list):
            raise ConfigError([f"{file}: this is a list, like a sources.yaml: use `reaper import-pgwatch sources`"])
        if not isinstance(data, Mapping):
            raise ConfigError([f"{file}: expected a YAML mapping with `metrics:` and `presets:`"])
        for key in data:
            if key not in ("metrics", "presets"):
                report(origin, str(key), "unknown top-level key (pgwatch reads only metrics and presets); dropped")
        for key, target in (("metrics", raw_metrics), ("presets", raw_presets)):
            section = data.get(key)
            if section is None:
                continue
            if not isinstance(section, Mapping):
                report(origin, key, f"expected a mapping of names to {key[:-1]} definitions; dropped")
                continue
            for name, raw in section.items():
                if str(name) in target and target[str(name)][0] != origin:
                    report(origin, f"{key}.{name}", f"also defined in {target[str(name)][0]}; this one is used "
                                                    "(as in pgwatch, the file read last wins)")
                target[str(name)] = (origin, raw)

    metrics: dict[str, dict[str, Any]] = {}
    commented: dict[str, dict[str, Any]] = {}
    for name, (origin, raw) in raw_metrics.items():
        result = _convert_metric(name, raw, origin, report, SPECIAL_METRICS)
        if result is None:
            continue
        table, ok = result
        (metrics if ok else commented)[name] = table

    shipped_metrics, _ = shipped_names()
    presets: dict[str, dict[str, Any]] = {}
    for name, (origin, raw) in raw_presets.items():
        preset = _convert_preset(name, raw, origin, report, set(metrics), shipped_metrics, set(commented))
        if preset is not None:
            presets[name] = preset

    replaced = sorted(set(metrics) & shipped_metrics)
    if replaced:
        report(str(path), "metrics", f"{len(replaced)} of these metrics have the names of metrics reaper ships "
                                     f"({', '.join(replaced[:5])}{', ...' if len(replaced) > 5 else ''}); in a "
                                     "config they replace reaper's own: keep only the ones you changed")
    extra = ["Put these tables into a reaper config (they replace reaper's own metrics and presets of the",
             "same name), then: reaper check --config CONFIG.toml"]
    body = ""
    if metrics:
        body += tomli_w.dumps({"metrics": metrics}, multiline_strings=True) + "\n"
    if presets:
        body += tomli_w.dumps({"presets": presets}, multiline_strings=True) + "\n"
    if commented:
        body += "# Metrics reaper would reject (see the notes above): fix them, then remove the '# '.\n"
        for name, table in commented.items():
            body += comment_out(tomli_w.dumps({"metrics": {name: table}}, multiline_strings=True)) + "\n"
    text = header("metrics", files, path, report.bare, extra) + body
    summary = f"{count(len(metrics), 'metric')}, {count(len(presets), 'preset')}" + (
        f", {count(len(commented), 'metric')} commented out" if commented else "")
    return ImportResult(text=text.rstrip() + "\n", notes=tuple(report.lines), summary=summary)


def _convert_metric(name: str, raw: Any, origin: str, report: Report,
                    reaper_own: frozenset[str]) -> tuple[dict[str, Any], bool] | None:
    """One pgwatch metric as a reaper table, and whether reaper accepts it (else it is written commented out)."""
    where = f"metrics.{name}"
    if not isinstance(raw, Mapping):
        report(origin, where, "expected a mapping of metric fields; dropped")
        return None
    out: dict[str, Any] = {}
    for key in raw:
        if key in METRIC_FIELDS:
            continue
        if key in METRIC_V2_FIELDS:
            report(origin, f"{where}.{key}", "a pgwatch v2 field that pgwatch no longer reads; not supported by "
                                              "reaper; dropped")
        else:
            report(origin, f"{where}.{key}", "unknown field (pgwatch ignores it too); dropped")

    description = as_text(raw.get("description"), origin, f"{where}.description", report)
    if description and one_line(description):
        out["description"] = one_line(description)
    gauges = raw.get("gauges")
    if isinstance(gauges, str):
        gauges = [gauges]
    if gauges is not None:
        if isinstance(gauges, list) and all(isinstance(g, str) for g in gauges):
            unique = list(dict.fromkeys(gauges))
            if len(unique) < len(gauges):
                report(origin, f"{where}.gauges", "a column listed twice; listed once")
            if unique:
                out["gauges"] = unique
        else:
            report(origin, f"{where}.gauges", f"expected a list of column names, got {gauges!r}; dropped")
    node_status = raw.get("node_status")
    if node_status is not None:
        status = {"primary": "primary", "master": "primary", "standby": "standby", "replica": "standby"}.get(
            str(node_status).strip().lower())
        if status is None:
            report(origin, f"{where}.node_status", f"{node_status!r} is not primary or standby; dropped "
                                                   "(the metric runs on both)")
        else:
            if status != node_status:
                report(origin, f"{where}.node_status", f"{node_status!r} written as {status!r}")
            out["node_status"] = status
    storage_name = as_text(raw.get("storage_name"), origin, f"{where}.storage_name", report)
    if storage_name:
        out["storage_name"] = storage_name
    instance_level = raw.get("is_instance_level")
    if instance_level is not None:
        if isinstance(instance_level, bool):
            if instance_level:
                out["instance_level"] = True
        else:
            report(origin, f"{where}.is_instance_level", f"expected true or false, got {instance_level!r}; dropped")
    timeout = raw.get("statement_timeout_seconds")
    if timeout is not None:
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and math.isfinite(timeout) \
                and timeout > 0:
            out["statement_timeout_seconds"] = timeout
        else:
            report(origin, f"{where}.statement_timeout_seconds", f"{timeout!r} is not a number of seconds above 0; "
                                                                 "dropped")

    sql: dict[str, str] = {}
    raw_sqls = raw.get("sqls")
    if raw_sqls is not None and not isinstance(raw_sqls, Mapping):
        report(origin, f"{where}.sqls", "expected a mapping of minimum PostgreSQL major version to SQL; dropped")
        raw_sqls = None
    first_words: set[str] = set()
    had_sql = False
    for key, text in (raw_sqls or {}).items():
        at = f"{where}.sqls.{key}"
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())) \
                or int(key) < 0:
            report(origin, at, "the key is not a PostgreSQL major version number; dropped")
            continue
        version = int(key)
        if str(version) in sql:
            report(origin, at, f"version {version} is given twice; the last one is used")
        if text is None:
            text = ""
        if not isinstance(text, str):
            report(origin, at, f"expected SQL text, got {text!r}; dropped")
            continue
        cleaned = clean_sql(text)
        if cleaned.empty:
            if name not in PGWATCH_SPECIAL and text.strip():
                report(origin, at, "only comments, no query; dropped (pgwatch skips it too)")
            continue
        had_sql = True
        if cleaned.semicolons:
            report(origin, at, "trailing semicolon removed (reaper embeds the query in a larger statement)")
        if cleaned.line_comments:
            report(origin, at, f"{cleaned.line_comments} '--' comment(s) turned into /* */ (reaper embeds the "
                               "query in a larger statement)")
        if cleaned.statements > 1:
            report(origin, at, "more than one statement (a ';' in the middle); reaper runs one SELECT/WITH query")
        first_words.add(cleaned.first_word)
        sql[str(version)] = cleaned.text

    if name in PGWATCH_SPECIAL:
        out["special"] = True
        report(origin, where, "a special metric that reaper collects with its own code: written as special = true"
                              + ("; its SQL is not used and is dropped" if had_sql else ""))
        sql = {}
    elif not sql:
        out["special"] = True
        report(origin, where, "has no SQL (pgwatch skips such a metric): written as special = true, which "
                              "reaper skips with a warning")
    elif name in reaper_own:
        report(origin, where, "reaper collects this metric itself (from the host it runs on) and does not run "
                              "its SQL; the SQL and init_sql are kept")
    if sql and first_words == {"show"}:
        kind = "pgpool" if name.startswith("pgpool") or any("pool_" in s.lower() for s in sql.values()) \
            else "pgbouncer"
        out["source_kinds"] = [kind]
        report(origin, where, f"its SQL is a SHOW command: written with source_kinds = [\"{kind}\"]")
    init_sql = as_text(raw.get("init_sql"), origin, f"{where}.init_sql", report)
    if init_sql and init_sql.strip():
        out["init_sql"] = init_sql.strip() + "\n"
    if sql:
        out["sql"] = dict(sorted(sql.items(), key=lambda kv: int(kv[0])))

    problems = [p.removeprefix(f"{where}.") for p in _check_metric_table(name, out)]
    for problem in problems:
        report(origin, where, f"reaper would reject it ({problem}); written commented out")
    return out, not problems


def _check_metric_table(name: str, table: dict[str, Any]) -> list[str]:
    """What reaper's own loader says about this table (the same checks `reaper check` runs)."""
    try:
        metric = converter.structure(table, MetricDef)
    except Exception as e:
        return _format_cattrs_errors(e, f"metrics.{name}")
    return check_metric(attrs.evolve(metric, name=name))


def _convert_preset(name: str, raw: Any, origin: str, report: Report, defined: set[str], shipped: set[str],
                    commented: set[str]) -> dict[str, Any] | None:
    where = f"presets.{name}"
    if not isinstance(raw, Mapping):
        report(origin, where, "expected a mapping with description and metrics; dropped")
        return None
    for key in raw:
        if key not in ("description", "metrics"):
            report(origin, f"{where}.{key}", "unknown field (pgwatch ignores it too); dropped")
    out: dict[str, Any] = {}
    description = as_text(raw.get("description"), origin, f"{where}.description", report)
    if description and one_line(description):
        out["description"] = one_line(description)
    entries = raw.get("metrics") or {}
    if not isinstance(entries, Mapping):
        report(origin, f"{where}.metrics", "expected a mapping of metric name to interval seconds; preset dropped")
        return None
    undefined = [str(m) for m in entries if str(m) not in defined and str(m) not in shipped]
    if entries and len(undefined) == len(entries) and not set(undefined) & commented:
        report(origin, where, f"none of its {len(entries)} metrics is defined (names like these are Prometheus "
                              "metric families for pgwatch's prometheus kind, which reaper does not collect); "
                              "preset dropped")
        return None
    metrics: dict[str, int] = {}
    for metric, seconds in entries.items():
        metric = str(metric)
        at = f"{where}.metrics.{metric}"
        if metric in commented and metric not in shipped:
            report(origin, at, "its definition is written commented out (see above); dropped from the preset")
            continue
        if metric not in defined and metric not in shipped:
            report(origin, at, "no such metric in this file (pgwatch skips it too); dropped")
            continue
        if metric not in defined:
            note = "written commented out" if metric in commented else "not defined in this file"
            report(origin, at, f"{note}: reaper's own definition of {metric} is used")
        value = interval(seconds, origin, at, report)
        if value is not None:
            metrics[metric] = value
    out["metrics"] = metrics
    return out
