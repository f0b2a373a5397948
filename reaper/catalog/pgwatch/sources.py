"""pgwatch's sources.yaml -> reaper `[[sources]]` TOML (and a placeholder sink, which `check` wants)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reaper import __version__
from reaper.catalog.pgwatch.common import (
    ImportResult,
    Report,
    array_table,
    as_text,
    comment_out,
    count,
    env_field,
    header,
    interval,
    literal_dollars,
    shipped_names,
    yaml_files,
)
from reaper.catalog.pgwatch.dsn import convert_dsn
from reaper.config.regex import are_problem
from reaper.config.schema import PGWATCH_KINDS, SourceConfig, _format_cattrs_errors, converter
from reaper.errors import ConfigError
from reaper.kinds import check_source

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
KINDS = {**{kind: kind for kind in ("postgres", "pgbouncer", "pgpool", "patroni")}, **PGWATCH_KINDS}


def import_sources(path: str | Path) -> ImportResult:
    """Convert a pgwatch sources.yaml (or a folder of them) to reaper `[[sources]]` TOML plus a sink."""
    from reaper.catalog.pgwatch.yamlread import read_yaml  # PyYAML only for YAML files: the daemon reads rows

    path = Path(path)
    report = Report()
    files = yaml_files(path)
    shipped_metrics, shipped_presets = shipped_names()
    written: list[dict[str, Any]] = []
    commented: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for file in files:
        origin = str(file)
        data = read_yaml(file, report)
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

    extra = ["Check it with: reaper check --config THIS_FILE.toml"]
    return _result(header("sources", files, path, report.bare, extra), written, commented, report)


def _result(head: str, written: list[dict[str, Any]], commented: list[dict[str, Any]], report: Report) -> ImportResult:
    body = "".join(_source_toml(src) + "\n" for src in written)
    body += ("# pgwatch's sinks are command-line options, not part of its sources. `reaper check` wants at\n"
             "# least one sink: edit this one (see conf/reaper.toml for the sink types).\n")
    body += array_table("sinks", {"type": "jsonfile", "path": "measurements.ndjson"})
    if commented:
        body += "\n# Sources reaper cannot load as they are (see the notes above): fix them, then remove the '# '.\n"
        body += "".join(comment_out(_source_toml(src)) + "\n" for src in commented)
    text = head + body
    summary = f"{count(len(written), 'source')}, 1 placeholder sink" + (
        f", {count(len(commented), 'source')} commented out" if commented else "")
    return ImportResult(text=text.rstrip() + "\n", notes=tuple(report.lines), summary=summary)


# ---------------------------------------------------------------------------------------------
# pgwatch's config database: rows of pgwatch.source (as {column: value}, see reaper.db.configdb)

# column -> the sources.yaml key it is (pgwatch's own mapping), so a row converts exactly as a YAML entry
DB_COLUMNS = {"name": "name", "connstr": "conn_str", "dbtype": "kind", "is_enabled": "is_enabled", "group": "group",
              "preset_config": "preset_metrics", "config": "custom_metrics",
              "preset_config_standby": "preset_metrics_standby", "config_standby": "custom_metrics_standby",
              "custom_tags": "custom_tags", "include_pattern": "include_pattern", "exclude_pattern": "exclude_pattern",
              "only_if_master": "only_if_master", "is_superuser": "is_superuser", "host_config": "host_config"}
DB_IGNORED_COLUMNS = frozenset({"last_modified_on"})  # bookkeeping of pgwatch's web UI
DB_FALSE_DEFAULTS = frozenset({"is_superuser", "only_if_master"})  # NOT NULL DEFAULT false: false says nothing


def row_as_yaml(row: Mapping[str, Any], origin: str, report: Report) -> dict[str, Any]:
    """One pgwatch.source row as the sources.yaml entry it stands for. A column reaper does not know
    is reported (one line) and left out; empty (null) columns and pgwatch's defaults that mean
    "nothing" (is_superuser, only_if_master false) are left out silently."""
    out: dict[str, Any] = {}
    for column, value in row.items():
        key = DB_COLUMNS.get(column)
        if column in DB_IGNORED_COLUMNS or value is None or (key in DB_FALSE_DEFAULTS and value is False):
            continue
        if key is None:
            report(origin, column, "a pgwatch.source column reaper does not know; ignored")
            continue
        out[key] = value
    return out


def convert_source_rows(rows: Sequence[Mapping[str, Any]], label: str
                        ) -> tuple[list[tuple[dict[str, Any], bool]], Report]:
    """Every pgwatch.source row as a reaper `[[sources]]` table and whether reaper can load it, and
    the report (origin of each line: `<label>: source NAME`)."""
    report = Report()
    shipped_metrics, shipped_presets = shipped_names()
    results = []
    for i, row in enumerate(rows):
        origin = f"{label}: pgwatch.source {str(row.get('name'))!r}"
        raw = row_as_yaml(row, origin, report)
        result = _convert_source(i, raw, origin, report, shipped_metrics, shipped_presets)
        if result is not None:
            results.append(result)
    return results, report


def import_source_rows(rows: Sequence[Mapping[str, Any]], label: str) -> ImportResult:
    """`reaper import-pgwatch sources --from-db DSN`: the rows read from the config database as TOML."""
    results, report = convert_source_rows(rows, label)
    written = [table for table, ok in results if ok]
    commented = [table for table, ok in results if not ok]
    lines = [f"Imported from the pgwatch config database {label} (table pgwatch.source, {count(len(rows), 'row')})",
             "by `reaper import-pgwatch sources --from-db` (reaper " + __version__ + ").",
             "Check it with: reaper check --config THIS_FILE.toml"]
    if report.bare:
        lines += ["", "Import notes (also printed on stderr when imported):"] + [f"  {n}" for n in report.lines]
    head = "".join(f"# {line}".rstrip() + "\n" for line in lines) + "\n"
    return _result(head, written, commented, report)



def _source_toml(table: Mapping[str, Any]) -> str:
    return array_table("sources", table)


def _convert_source(i: int, raw: Any, origin: str, report: Report, shipped_metrics: set[str],
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
        value = as_text(raw.get(key), origin, f"{where}.{key}", report)
        return value if value and value.strip() else None

    out: dict[str, Any] = {}
    loadable = True

    name = text_field("name")
    if name is None:
        name = f"source_{i}"
        note("name", f"missing; named {name!r}")
    # pgwatch expands $VAR / ${VAR} in a value that starts with `$`; reaper expands them in every source
    # string: a reference is kept (as ${VAR}), a literal `$` is escaped ($$)
    name, _ = env_field(name)
    out["name"] = name

    kind_raw = text_field("kind") or "postgres"
    kind: str | None
    kind_from_env = kind_raw.startswith("$")
    if kind_from_env:
        kind, _ = env_field(kind_raw.strip())
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
        dsn, dsn_ok = convert_dsn(conn_str, lambda message: note("conn_str", message))
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
        out["group"] = env_field(group)[0]

    for pkey, okey, mkey, omkey in (("preset_metrics", "preset", "custom_metrics", "metrics"),
                                    ("preset_metrics_standby", "standby_preset", "custom_metrics_standby",
                                     "standby_metrics")):
        preset = text_field(pkey)
        if preset is not None:
            preset = env_field(preset)[0]
            if preset not in shipped_presets and "${" not in preset:
                note(pkey, f"{preset!r} is not a preset reaper ships: import its definition with "
                           "`reaper import-pgwatch metrics` into the same config, or `reaper check` rejects it")
            out[okey] = preset
        custom = raw.get(mkey)
        intervals: dict[str, int] = {}
        if custom is not None and not isinstance(custom, Mapping):
            note(mkey, f"expected a mapping of metric name to interval seconds, got {custom!r}; dropped")
        elif custom:
            for metric, seconds in custom.items():
                value = interval(seconds, origin, f"{where}.{mkey}.{metric}", report)
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
                converted[str(key)] = literal_dollars(text)
            if converted:
                out["tags"] = converted
        else:
            note("custom_tags", f"expected a mapping of tag name to value, got {tags!r}; dropped")

    discovery = out["kind"] in ("postgres-discovery", "patroni") or kind_from_env
    for key in ("include_pattern", "exclude_pattern"):
        pattern = text_field(key)
        if pattern is None:
            continue
        pattern, env = env_field(pattern)
        problem = None if env else are_problem(pattern.replace("$$", "$"))
        if problem is not None:  # (pgwatch's discovery fails on it at every refresh)
            note(key, f"{pattern!r} is not a regular expression PostgreSQL accepts: {problem}; the source is not "
                      "loadable until it is fixed")
            loadable = False
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

    if loadable and any("${" in v for v in _strings(out)):
        pass  # taken from the environment at load time: `reaper check` with the variables set verifies it
    elif loadable:
        try:
            source = converter.structure(out, SourceConfig)
        except Exception as e:  # cattrs groups; should not happen for what is built above
            for line in _format_cattrs_errors(e, where):
                note("", f"reaper would reject it ({line}); written commented out")
            loadable = False
        else:
            problems = check_source(source)
            for problem in problems:
                note("", f"reaper would reject it ({problem}); written commented out")
            loadable = not problems
    return out, loadable


def _strings(value: Any) -> list[str]:
    """Every string in a source table (values of sub-tables too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    return []
