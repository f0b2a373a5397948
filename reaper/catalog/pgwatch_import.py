"""Import pgwatch's YAML (metrics.yaml with presets, sources.yaml) as reaper TOML.

Pure apart from reading the input: `import_metrics(path)` and `import_sources(path)` return the TOML
text and the report, one line per thing that was changed, dropped or needs a hand:
`FILE: key.path: what happened`. Nothing is dropped without a line. An input that cannot be read or
parsed raises ConfigError with one line. What reaper would reject (`reaper check`) is written
commented out, so the result always loads and nothing is lost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w
import yaml

from reaper import __version__
from reaper.catalog.definitions import check_metric
from reaper.config.files import read_text
from reaper.config.schema import MetricDef, SourceConfig, converter
from reaper.errors import ConfigError

# pgwatch's special metrics: reaper collects them with its own code, never with their SQL.
PGWATCH_SPECIAL = frozenset({"instance_up", "change_events", "server_log_event_counts"})

# Fields of pgwatch's Metric (internal/metrics/types.go) plus the documented statement_timeout_seconds.
METRIC_FIELDS = ("description", "sqls", "gauges", "node_status", "is_instance_level", "storage_name",
                 "statement_timeout_seconds", "init_sql")
# pgwatch v2 leftovers (MetricAttrs): pgwatch parses none of them.
METRIC_V2_FIELDS = frozenset({"is_private", "disabled_days", "disabled_times",
                              "extension_version_based_overrides"})

SOURCE_FIELDS = ("name", "conn_str", "kind", "is_enabled", "group", "preset_metrics", "custom_metrics",
                 "preset_metrics_standby", "custom_metrics_standby", "custom_tags", "include_pattern",
                 "exclude_pattern", "only_if_master", "is_superuser", "host_config")
SOURCE_HINTS = {
    "dbname_include_pattern": "a pgwatch v2 key that pgwatch v3 ignores; the v3 key is include_pattern",
    "dbname_exclude_pattern": "a pgwatch v2 key that pgwatch v3 ignores; the v3 key is exclude_pattern",
    "stmt_timeout": "a pgwatch v2 key that pgwatch v3 ignores; reaper's is query_timeout_seconds",
    "is_superuser": "not used by reaper",
    "host_config": "not supported by reaper (patroni DCS settings and log parsing options)",
}
KINDS = {
    "postgres": "postgres",
    "postgres-continuous-discovery": "postgres-discovery",
    "pgbouncer": "pgbouncer",
    "pgpool": "pgpool",
    "patroni": "patroni",
    "patroni-continuous-discovery": "patroni",
    "patroni-namespace-discovery": "patroni",
}

_ENV_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_URI = re.compile(r"^postgres(ql)?://", re.IGNORECASE)
_WHOLE_ENV = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


@attrs.frozen
class ImportResult:
    text: str  # the TOML document
    notes: tuple[str, ...]  # report lines, `FILE: key.path: what happened`
    summary: str  # what was written, e.g. "75 metrics, 15 presets, 1 commented out"


class _Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.bare: list[str] = []  # the same without the file name, for the header comment

    def __call__(self, origin: str, where: str, message: str) -> None:
        text = f"{where}: {message}" if where else message
        self.lines.append(f"{origin}: {text}")
        self.bare.append(text)


# ---------------------------------------------------------------------------------------------
# Reading YAML the way pgwatch (yaml.v3) reads it


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false, as Go's yaml.v3) and duplicate keys recorded, not lost."""

    duplicates: list[tuple[int, Any]]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    self.duplicates.append((key_node.start_mark.line + 1, key))
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml_files(path: Path) -> list[Path]:
    """A file, or every *.yaml/*.yml under a folder (pgwatch accepts both)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".yaml", ".yml"))
        if not files:
            raise ConfigError([f"{path}: no *.yaml or *.yml files in this folder"])
        return files
    return [path]


def _read_yaml(path: Path, report: _Report) -> Any:
    text = read_text(path, "YAML file")
    loader = _Loader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(e.problem or e.context or "syntax error").split())
        raise ConfigError([f"{path}: invalid YAML{where}: {what}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: invalid YAML: {' '.join(str(e).split())}"]) from None
    finally:
        loader.dispose()
    for line, key in loader.duplicates:
        report(str(path), f"line {line}", f"duplicate key {key!r}: the last one is used "
                                          "(pgwatch refuses a file with duplicate keys)")
    return data


# ---------------------------------------------------------------------------------------------
# SQL: pgwatch's queries end with ';' and use -- comments; reaper embeds each in a larger statement


def _sql_tokens(sql: str) -> list[tuple[str, str]]:
    """Split SQL into (kind, text): ws, comment (/* */, nested), line (--), literal, ';', other."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(sql)
    other_start = -1

    def flush(end: int) -> None:
        nonlocal other_start
        if other_start >= 0:
            tokens.append(("other", sql[other_start:end]))
            other_start = -1

    while i < n:
        c = sql[i]
        start = i
        if c.isspace():
            while i < n and sql[i].isspace():
                i += 1
            kind = "ws"
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            kind = "line"
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            kind = "comment"
        elif c == "'":
            escapes = start > 0 and sql[start - 1] in "eE" and (start < 2 or not (sql[start - 2].isalnum()
                                                                                 or sql[start - 2] == "_"))
            i += 1
            while i < n:
                if escapes and sql[i] == "\\":
                    i += 2
                elif sql[i] == "'":
                    if sql.startswith("''", i):
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    i += 1
            kind = "literal"
        elif c == '"':
            i += 1
            while i < n:
                if sql.startswith('""', i):
                    i += 2
                elif sql[i] == '"':
                    i += 1
                    break
                else:
                    i += 1
            kind = "literal"
        elif c == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", sql[i:])) and not (
                start > 0 and (sql[start - 1].isalnum() or sql[start - 1] in "_$")):
            end = sql.find(m.group(0), i + len(m.group(0)))
            i = n if end < 0 else end + len(m.group(0))
            kind = "literal"
        elif c == ";":
            i += 1
            kind = ";"
        else:
            if other_start < 0:
                other_start = i
            i += 1
            continue
        flush(start)
        tokens.append((kind, sql[start:i]))
    flush(n)
    return tokens


@attrs.frozen
class CleanSQL:
    text: str
    empty: bool  # nothing but comments, whitespace and semicolons
    semicolons: int  # trailing semicolons removed
    line_comments: int  # -- comments turned into /* */
    statements: int  # statements left (more than 1 is not one query)
    first_word: str


def clean_sql(sql: str) -> CleanSQL:
    """Trailing semicolons removed, -- comments turned into /* */, surrounding whitespace stripped."""
    tokens = _sql_tokens(sql)
    significant = [i for i, (kind, _) in enumerate(tokens) if kind in ("literal", ";", "other")]
    trailing: set[int] = set()
    for i in reversed(significant):
        if tokens[i][0] != ";":
            break
        trailing.add(i)
    out: list[str] = []
    line_comments = 0
    for i, (kind, text) in enumerate(tokens):
        if i in trailing:
            continue
        if kind == "line":
            body = text[2:].strip().replace("*/", "* /").replace("/*", "/ *")
            out.append(f"/* {body} */" if body else "")
            line_comments += 1
        else:
            out.append(text)
    rest = [tokens[i] for i in significant if i not in trailing]
    words = [text for kind, text in rest if kind == "other"]
    first = words[0].split()[0].lower() if words and words[0].split() else ""
    return CleanSQL(text="".join(out).strip(), empty=not rest, semicolons=len(trailing),
                    line_comments=line_comments, statements=1 + sum(1 for kind, _ in rest if kind == ";"),
                    first_word=re.sub(r"[^a-z_]+.*", "", first))


# ---------------------------------------------------------------------------------------------
# Small value helpers


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _env_field(value: str) -> tuple[str, list[str]]:
    """pgwatch expands `$VAR`/`${VAR}` in a field whose value starts with `$`: return ours (`${VAR}`)."""
    if not value.startswith("$"):
        return value, []
    names: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        names.append(name)
        return "${" + name + "}"

    return _ENV_REF.sub(repl, value), names


def _interval(value: Any, origin: str, where: str, report: _Report) -> int | None:
    """pgwatch intervals are seconds (a float in sources); 0 or less disables. Ours: whole seconds, 0 disables."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float) and \
            not math.isfinite(value)):
        report(origin, where, f"interval {value!r} is not a number of seconds; dropped")
        return None
    if value <= 0:
        if value < 0:
            report(origin, where, f"interval {value!r} disables the metric in pgwatch; written as 0 (disabled)")
        return 0
    if isinstance(value, float) and not value.is_integer():
        report(origin, where, f"interval {value!r} is not whole seconds; rounded up to {math.ceil(value)}")
        return math.ceil(value)
    return int(value)


def _text(value: Any, origin: str, where: str, report: _Report) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool | list | dict):
        report(origin, where, f"expected text, got {value!r}; dropped")
        return None
    return value if isinstance(value, str) else str(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _commented(toml_text: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in toml_text.strip().splitlines())


def _header(kind: str, files: list[Path], path: Path, notes: list[str], extra: list[str]) -> str:
    source = str(path) if len(files) == 1 else f"{path} ({len(files)} files)"
    lines = [f"Imported from pgwatch's {kind} file {source}",
             f"by `reaper import-pgwatch {kind}` (reaper {__version__}).", *extra]
    if notes:
        lines += ["", "Import notes (also printed on stderr when imported):"] + [f"  {n}" for n in notes]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines) + "\n"


def _shipped() -> tuple[set[str], set[str]]:
    """Names of the metrics and presets reaper ships (empty if the shipped files do not load)."""
    from reaper.catalog.metrics import load_shipped_definitions

    try:
        shipped = load_shipped_definitions()
    except ConfigError:
        return set(), set()
    return set(shipped.metrics), set(shipped.presets)


# ---------------------------------------------------------------------------------------------
# metrics.yaml -> [metrics.NAME] and [presets.NAME]


def import_metrics(path: str | Path) -> ImportResult:
    """Convert a pgwatch metrics.yaml (or a folder of them) to reaper `[metrics.*]`/`[presets.*]` TOML."""
    from reaper.catalog.metrics import SPECIAL_METRICS

    path = Path(path)
    report = _Report()
    files = _yaml_files(path)
    raw_metrics: dict[str, tuple[str, Any]] = {}
    raw_presets: dict[str, tuple[str, Any]] = {}
    for file in files:
        origin = str(file)
        data = _read_yaml(file, report)
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

    shipped_metrics, _ = _shipped()
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
            body += _commented(tomli_w.dumps({"metrics": {name: table}}, multiline_strings=True)) + "\n"
    text = _header("metrics", files, path, report.bare, extra) + body
    summary = f"{_count(len(metrics), 'metric')}, {_count(len(presets), 'preset')}" + (
        f", {_count(len(commented), 'metric')} commented out" if commented else "")
    return ImportResult(text=text.rstrip() + "\n", notes=tuple(report.lines), summary=summary)


def _convert_metric(name: str, raw: Any, origin: str, report: _Report,
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

    description = _text(raw.get("description"), origin, f"{where}.description", report)
    if description and _one_line(description):
        out["description"] = _one_line(description)
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
    storage_name = _text(raw.get("storage_name"), origin, f"{where}.storage_name", report)
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
    init_sql = _text(raw.get("init_sql"), origin, f"{where}.init_sql", report)
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
    from reaper.config.schema import _format_cattrs_errors

    try:
        metric = converter.structure(table, MetricDef)
    except Exception as e:
        return _format_cattrs_errors(e, f"metrics.{name}")
    return check_metric(attrs.evolve(metric, name=name))


def _convert_preset(name: str, raw: Any, origin: str, report: _Report, defined: set[str], shipped: set[str],
                    commented: set[str]) -> dict[str, Any] | None:
    where = f"presets.{name}"
    if not isinstance(raw, Mapping):
        report(origin, where, "expected a mapping with description and metrics; dropped")
        return None
    for key in raw:
        if key not in ("description", "metrics"):
            report(origin, f"{where}.{key}", "unknown field (pgwatch ignores it too); dropped")
    out: dict[str, Any] = {}
    description = _text(raw.get("description"), origin, f"{where}.description", report)
    if description and _one_line(description):
        out["description"] = _one_line(description)
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
        value = _interval(seconds, origin, at, report)
        if value is not None:
            metrics[metric] = value
    out["metrics"] = metrics
    return out


# ---------------------------------------------------------------------------------------------
# sources.yaml -> [[sources]]


def import_sources(path: str | Path) -> ImportResult:
    """Convert a pgwatch sources.yaml (or a folder of them) to reaper `[[sources]]` TOML plus a sink."""
    path = Path(path)
    report = _Report()
    files = _yaml_files(path)
    shipped_metrics, shipped_presets = _shipped()
    written: list[dict[str, Any]] = []
    commented: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for file in files:
        origin = str(file)
        data = _read_yaml(file, report)
        if data is None:
            report(origin, "", "empty file: no sources")
            continue
        if not isinstance(data, list):
            hint = ("; this looks like a metrics.yaml: use `reaper import-pgwatch metrics`"
                    if isinstance(data, Mapping) and ("metrics" in data or "presets" in data) else "")
            raise ConfigError([f"{file}: expected a YAML list of sources (pgwatch's sources.yaml format){hint}"])
        for i, raw in enumerate(data):
            result = _convert_source(i, raw, origin, report, shipped_metrics, shipped_presets)
            if result is None:
                continue
            table, ok = result
            name = table["name"]
            if name in names:
                new = name
                n = 2
                while new in names:
                    new, n = f"{name}_{n}", n + 1
                report(origin, f"sources[{i}].name", f"{name!r} is also the name of {names[name]} (pgwatch refuses "
                                                     f"duplicate names); renamed {new!r}")
                table["name"] = new
            names[table["name"]] = f"sources[{i}] of {origin}"
            (written if ok else commented).append(table)

    body = "".join(_source_toml(src) + "\n" for src in written)
    body += ("# pgwatch's sinks are command-line options, not part of sources.yaml. `reaper check` wants at\n"
             "# least one sink: edit this one (see conf/reaper.toml for the sink types).\n")
    body += _array_table("sinks", {"type": "jsonfile", "path": "measurements.ndjson"})
    if commented:
        body += "\n# Sources reaper cannot load as they are (see the notes above): fix them, then remove the '# '.\n"
        body += "".join(_commented(_source_toml(src)) + "\n" for src in commented)
    extra = ["Check it with: reaper check --config THIS_FILE.toml"]
    text = _header("sources", files, path, report.bare, extra) + body
    summary = f"{_count(len(written), 'source')}, 1 placeholder sink" + (
        f", {_count(len(commented), 'source')} commented out" if commented else "")
    return ImportResult(text=text.rstrip() + "\n", notes=tuple(report.lines), summary=summary)


def _array_table(name: str, table: Mapping[str, Any]) -> str:
    """One `[[name]]` table; nested mappings written inline (`metrics = { wal = 60 }`), as in conf/reaper.toml."""
    lines = [f"[[{name}]]"]
    for key, value in table.items():
        if isinstance(value, Mapping):
            items = ", ".join(tomli_w.dumps({k: v}).strip() for k, v in value.items())
            lines.append(f"{key} = {{ {items} }}" if items else f"{key} = {{}}")
        else:
            lines.append(tomli_w.dumps({key: value}).strip())
    return "\n".join(lines) + "\n"


def _source_toml(table: Mapping[str, Any]) -> str:
    return _array_table("sources", table)


def _convert_source(i: int, raw: Any, origin: str, report: _Report, shipped_metrics: set[str],
                    shipped_presets: set[str]) -> tuple[dict[str, Any], bool] | None:
    where = f"sources[{i}]"

    def note(key: str, message: str) -> None:
        report(origin, f"{where}.{key}" if key else where, message)

    if not isinstance(raw, Mapping):
        note("", f"expected a mapping of source fields, got {raw!r}; dropped")
        return None
    for key in raw:
        if key in SOURCE_HINTS:
            note(str(key), f"{SOURCE_HINTS[key]}; dropped")
        elif key not in SOURCE_FIELDS:
            note(str(key), "unknown field (pgwatch ignores it too); dropped")

    def text_field(key: str) -> str | None:
        value = _text(raw.get(key), origin, f"{where}.{key}", report)
        return value if value and value.strip() else None

    out: dict[str, Any] = {}
    loadable = True

    name = text_field("name")
    if name is None:
        name = f"source_{i}"
        note("name", f"missing; named {name!r}")
    name, env = _env_field(name)
    if env:
        note("name", f"pgwatch reads it from ${env[0]}; reaper expands ${{VAR}} only in a dsn, so the name is "
                     f"the literal text {name!r}: write the name itself")
    out["name"] = name

    kind_raw = text_field("kind") or "postgres"
    kind: str | None
    kind_from_env = kind_raw.startswith("$")
    if kind_from_env:
        note("kind", f"pgwatch reads it from {kind_raw}; reaper needs it written out: \"postgres\" used, edit it "
                     "if the source is another kind")
        kind = "postgres"
    else:
        kind = KINDS.get(kind_raw.strip().lower())
        if kind is None:
            why = ("pgwatch's prometheus kind scrapes an exporter, which reaper does not do" if kind_raw == "prometheus"
                   else "an unknown kind (pgwatch's are " + ", ".join(KINDS) + ")")
            note("kind", f"{kind_raw!r}: {why}; the source is written commented out")
            loadable = False
        elif kind != kind_raw:
            extra = (" (pgwatch's namespace discovery also adds the scope to each name; reaper's patroni kind "
                     "will decide its own naming)" if kind_raw == "patroni-namespace-discovery" else "")
            note("kind", f"{kind_raw!r} written as {kind!r}{extra}")

    conn_str = text_field("conn_str")
    dsn: str | None = None
    if conn_str is None:
        note("conn_str", "missing; the source is written commented out")
        loadable = False
    else:
        dsn, dsn_ok = _convert_dsn(conn_str, lambda message: note("conn_str", message))
        loadable = loadable and dsn_ok
    out["dsn"] = dsn or ""
    out["kind"] = kind or kind_raw

    enabled = raw.get("is_enabled")
    if enabled is None:
        note("is_enabled", "not set: pgwatch does not monitor a source unless is_enabled is true; written as "
                           "enabled = false")
        out["enabled"] = False
    elif not isinstance(enabled, bool):
        note("is_enabled", f"expected true or false, got {enabled!r}; written as enabled = false")
        out["enabled"] = False
    elif not enabled:
        out["enabled"] = False

    group = text_field("group")
    if group is not None:
        group, env = _env_field(group)
        if env:
            note("group", f"pgwatch reads it from ${env[0]}; reaper does not expand variables here, so the group "
                          f"is the literal text {group!r}: write the group itself")
        out["group"] = group

    for pkey, okey, mkey, omkey in (("preset_metrics", "preset", "custom_metrics", "metrics"),
                                    ("preset_metrics_standby", "standby_preset", "custom_metrics_standby",
                                     "standby_metrics")):
        preset = text_field(pkey)
        if preset is not None and preset.startswith("$"):
            note(pkey, f"pgwatch reads it from {preset}; reaper does not expand variables here: dropped, write "
                       "the preset name")
            preset = None
        if preset is not None:
            if preset not in shipped_presets:
                note(pkey, f"{preset!r} is not a preset reaper ships: import its definition with "
                           "`reaper import-pgwatch metrics` into the same config, or `reaper check` rejects it")
            out[okey] = preset
        custom = raw.get(mkey)
        intervals: dict[str, int] = {}
        if custom is not None and not isinstance(custom, Mapping):
            note(mkey, f"expected a mapping of metric name to interval seconds, got {custom!r}; dropped")
        elif custom:
            for metric, seconds in custom.items():
                value = _interval(seconds, origin, f"{where}.{mkey}.{metric}", report)
                if value is not None:
                    intervals[str(metric)] = value
            unknown = sorted(m for m in intervals if m not in shipped_metrics)
            if unknown:
                note(mkey, f"{', '.join(unknown)}: not shipped with reaper: import the definitions with `reaper "
                           "import-pgwatch metrics` into the same config, or `reaper check` rejects them")
        if intervals:
            out[omkey] = intervals
            if preset is not None:
                note(mkey, f"given with {pkey}: pgwatch then uses only the preset; reaper uses the preset with "
                           f"these intervals laid over it ({okey} + {omkey})")

    tags = raw.get("custom_tags")
    if tags is not None:
        if isinstance(tags, Mapping):
            converted: dict[str, str] = {}
            for key, value in tags.items():
                if value is None or isinstance(value, list | dict):
                    note(f"custom_tags.{key}", f"expected text, got {value!r}; dropped")
                    continue
                text = str(value).lower() if isinstance(value, bool) else str(value)
                if not isinstance(value, str):
                    note(f"custom_tags.{key}", f"{value!r} written as the text {text!r}")
                converted[str(key)] = text
            if converted:
                out["tags"] = converted
        else:
            note("custom_tags", f"expected a mapping of tag name to value, got {tags!r}; dropped")

    discovery = out["kind"] in ("postgres-discovery", "patroni")
    for key in ("include_pattern", "exclude_pattern"):
        pattern = text_field(key)
        if pattern is None:
            continue
        pattern, env = _env_field(pattern)
        if env:
            note(key, f"pgwatch reads it from ${env[0]}; reaper does not expand variables here, so the pattern is "
                      f"the literal text {pattern!r}: write the pattern itself")
        try:
            re.compile(pattern)
        except re.error:
            note(key, "not a regular expression Python understands (PostgreSQL's may still accept it); kept")
        if not discovery:
            note(key, f"pgwatch uses it only for discovery kinds, not for {out['kind']!r}; dropped")
            continue
        out[key] = pattern

    only = raw.get("only_if_master")
    if only is not None:
        if isinstance(only, bool):
            out["only_if_primary"] = only
            if only and out["kind"] != "patroni":
                note("only_if_master", f"pgwatch uses it only for the patroni kind; reaper applies only_if_primary "
                                       f"to a {out['kind']!r} source too (no metrics while it is in recovery)")
        else:
            note("only_if_master", f"expected true or false, got {only!r}; dropped")

    if loadable:
        try:
            source = converter.structure(out, SourceConfig)
        except Exception as e:  # cattrs groups; should not happen for what is built above
            from reaper.config.schema import _format_cattrs_errors

            for line in _format_cattrs_errors(e, where):
                note("", f"reaper would reject it ({line}); written commented out")
            loadable = False
        else:
            from reaper.kinds import check_source

            problems = [] if "${" in source.dsn else check_source(source)
            for problem in problems:
                note("", f"reaper would reject it ({problem}); written commented out")
            loadable = not problems
    return out, loadable


def _convert_dsn(conn_str: str, note: Callable[[str], None]) -> tuple[str, bool]:
    """pgwatch's conn_str as our dsn, and whether `reaper check` accepts it."""
    value = conn_str.strip()
    if value.startswith("$"):
        dsn, names = _env_field(value)
        if _WHOLE_ENV.match(dsn):
            note(f"pgwatch reads it from ${names[0]}: written as dsn = \"{dsn}\", which reaper expands when it "
                 "loads the config; that variable must then hold a postgresql:// URI")
        else:
            note(f"written as {dsn!r}: reaper expands ${{VAR}} when it loads the config")
        return dsn, True
    if _URI.match(value):
        scheme, rest = value.split("://", 1)
        value = f"{scheme.lower()}://{rest}"
        _warn_password(value, note)
        return value, True
    if value.lower().startswith("etcd://"):
        return value, True  # patroni's DCS; whether the kind fits is checked with the rest of the source
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        scheme = value.split("://", 1)[0]
        dcs = " (of Patroni's DCSs only etcd is supported)" if scheme in ("consul", "zookeeper") else ""
        note(f"the address is {scheme}://...: reaper connects only to postgresql:// URIs and reads Patroni "
             f"members from etcd://{dcs}; the source is written commented out")
        return _redact_userinfo(value), False
    try:
        pairs = parse_keyword_dsn(value)
    except ValueError as e:
        note(f"neither a postgresql:// URI nor a libpq key=value string ({e}); the source is written commented out")
        return "", False
    dsn = keyword_dsn_to_uri(pairs)
    note("libpq key=value string written as a postgresql:// URI")
    _warn_password(dsn, note)
    return dsn, True


def _redact_userinfo(uri: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", uri)


def _warn_password(dsn: str, note: Callable[[str], None]) -> None:
    m = re.match(r"^[^:]+://([^/?#]*)@", dsn)
    inline = bool(m and ":" in m.group(1) and not re.search(r":\$\{[^}]+\}$", m.group(1)))
    query = re.search(r"[?&]password=([^&]*)", dsn)
    if inline or (query and not query.group(1).startswith("${")):
        note("has a password in it, kept as it is: better put ${ENV_VAR} in the dsn, or use ~/.pgpass or "
             "password_file, and keep the config free of secrets")


def parse_keyword_dsn(text: str) -> list[tuple[str, str]]:
    """libpq's `key=value key='quoted \\' value'` connection string as (key, value) pairs."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i:])
        if not m:
            raise ValueError(f"unexpected {text[i]!r} at position {i + 1}")
        key = m.group(0)
        i += len(key)
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=":
            raise ValueError(f"missing '=' after {key!r}")
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError(f"unterminated quoted value of {key!r}")
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    value.append(text[i])
                    i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                else:
                    value.append(text[i])
                    i += 1
        pairs.append((key, "".join(value)))
    if not pairs:
        raise ValueError("empty")
    return pairs


def keyword_dsn_to_uri(pairs: list[tuple[str, str]]) -> str:
    """The same connection as a postgresql:// URI (libpq's URI form: hosts and ports, user, password, dbname)."""
    from urllib.parse import quote, urlencode

    params = dict(pairs)
    user = params.pop("user", None)
    password = params.pop("password", None)
    dbname = params.pop("dbname", None)
    hosts = [h.strip() for h in params.pop("host", "").split(",")] if "host" in params else []
    ports = [p.strip() for p in params.pop("port", "").split(",")] if "port" in params else []
    query: dict[str, str] = {}
    netloc_hosts: list[str] = []
    if any(h.startswith(("/", "@")) for h in hosts) or len(ports) > max(len(hosts), 1):
        query["host"] = ",".join(hosts) if hosts else ""
        if not query["host"]:
            del query["host"]
        if ports:
            query["port"] = ",".join(ports)
    else:
        for n, host in enumerate(hosts or [""]):
            port = ports[n] if n < len(ports) else (ports[0] if len(ports) == 1 else "")
            shown = f"[{host}]" if ":" in host else quote(host, safe="")
            netloc_hosts.append(f"{shown}:{port}" if port else shown)
    userinfo = ""
    if user is not None:
        userinfo = quote(user, safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    netloc = (userinfo + "@" if userinfo else "") + ",".join(netloc_hosts)
    query.update(params)
    uri = f"postgresql://{netloc}/{quote(dbname, safe='') if dbname else ''}"
    if query:
        uri += "?" + urlencode(query, safe="/,@", quote_via=quote)
    return uri
