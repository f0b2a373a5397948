"""Loading a configuration: reading TOML, environment expansion, file checks and `load_config(path)`.

Every problem is reported as one line `FILE: key.path: what is wrong`, all problems at once.

Environment variables are expanded as pgwatch's sources.yaml does, in every string value of a
[[sources]] table (name, group, kind, preset, dsn, patterns, tag values, ...) and in a [[sinks]] dsn:
`$NAME` and `${NAME}` become the variable's value, `$$` a literal `$`; a `$` followed by anything
else stays as it is. An unset variable is one problem naming the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from reaper.catalog.definitions import structure_definitions
from reaper.catalog.metrics import load_shipped_definitions
from reaper.config.files import read_toml
from reaper.config.libpq import file_parameters
from reaper.config.redact import redact_dsn, remember_secrets
from reaper.config.rules import DSN_EXPECTED, name_problem
from reaper.config.schema import (
    PGWATCH_KINDS,
    CollectorConfig,
    Config,
    FleetConfig,
    JsonFileSinkConfig,
    PostgresSinkConfig,
    PrometheusSinkConfig,
    SinkConfig,
    SourceConfig,
    SourcesFromConfig,
    _format_cattrs_errors,
    converter,
    default_state_dir,
    structure_sink,
    unknown_key,
)
from reaper.config.standin import STAND_INS, stand_in
from reaper.config.topn import reference_problems
from reaper.errors import ConfigError
from reaper.kinds import check_source

# ---------------------------------------------------------------------------------------------
# Environment expansion

_VAR_RE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*)|(\{))")


def expand_variables(text: str, environ: Mapping[str, str]) -> tuple[str, list[str], bool]:
    """`$NAME`, `${NAME}` -> value, `$$` -> `$`. Returns the text, the unset names (in order of
    appearance, as written: `$X` or `${X}`), and whether a `${` lacks its closing `}`."""
    missing: list[str] = []
    unterminated = False

    def repl(m: re.Match[str]) -> str:
        nonlocal unterminated
        if m.group(1):
            return "$"
        if m.group(4):
            unterminated = True
            return m.group(0)
        name = m.group(2) or m.group(3)
        if name not in environ:
            missing.append(m.group(0))
            return m.group(0)
        return environ[name]

    return _VAR_RE.sub(repl, text), missing, unterminated


def expand_env(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand the environment in text (see expand_variables); return it and the unset variables' names."""
    result, missing, _ = expand_variables(text, environ)
    return result, [ref.strip("${}") for ref in missing]


def _expand_value(value: str, where: str, environ: Mapping[str, str], secret: bool) -> tuple[str, list[str]]:
    result, missing, unterminated = expand_variables(value, environ)
    problems = []
    if unterminated:
        problems.append(f"{where}: `${{` without a closing `}}` (write $$ for a literal $)")
    shown = redact_dsn(value) if secret else value
    for ref in missing:
        if ref.startswith("${") or ref in shown:  # `$word` inside a password may be a piece of it
            hint = "" if ref.startswith("${") else " (write $$ for a literal $)"
            problems.append(f"{where}: environment variable {ref.strip('${}')} is not set{hint}")
        else:  # inside a password: do not print any part of it
            problems.append(f"{where}: an environment variable in the password is not set "
                            f"(write $$ for a literal $ in a password)")
    return result, problems


def expand_table(raw: Mapping[str, Any], where: str, environ: Mapping[str, str],
                 keys: frozenset[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Expand the environment in a table's string values (and in the string values of its sub-tables and
    lists), only in `keys` when given. Mapping keys (metric names, tag keys) are never expanded."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        here = f"{where}.{key}"
        secret = key == "dsn"
        if keys is not None and key not in keys:
            out[key] = value
        elif isinstance(value, str):
            out[key], found = _expand_value(value, here, environ, secret)
            problems.extend(found)
        elif isinstance(value, Mapping):
            out[key], found = expand_table(value, here, environ)
            problems.extend(found)
        elif isinstance(value, list):
            items = []
            for i, item in enumerate(value):
                if isinstance(item, str):
                    item, found = _expand_value(item, f"{here}[{i}]", environ, secret)
                    problems.extend(found)
                items.append(item)
            out[key] = items
        else:
            out[key] = value
    return out, problems


# ---------------------------------------------------------------------------------------------
# Loading

TOP_LEVEL_KEYS = ["collector", "fleet", "metrics", "presets", "sinks", "sources", "sources_from"]
_SINK_EXPANDED = frozenset({"dsn", "password_file"})
T = TypeVar("T")


def _defined(top_n: Mapping[str, T], broken: Mapping[str, set[str]]) -> dict[str, T]:
    """A top_n table without the metrics whose own definition did not structure (their lines say why)."""
    return {name: level for name, level in top_n.items() if name not in broken.get("metrics", ())}


def _check_intervals(where: str, intervals: Mapping[str, int], known: Collection[str]) -> list[str]:
    """Metrics an interval table names that no definition has (the values' range is the model's rule)."""
    return [f"{where}.{metric}: unknown metric" for metric in intervals if metric not in known]


def _check_file(where: str, path: str | None, what: str) -> list[str]:
    """A file the daemon will read: it must exist and be a file."""
    if path is None:
        return []
    p = Path(path)
    if p.is_dir():
        return [f"{where}: {path} is a directory, expected {what}"]
    if not p.exists():
        return [f"{where}: {path}: file not found"]
    return []


def _dsn_files(where: str, dsn: str) -> list[str]:
    """The files a dsn names for its connect (sslrootcert, sslcert, sslkey, sslcrl, passfile): one missing made
    every connect fail with "No such file or directory", naming no file. A relative path is libpq's (the
    daemon's working directory): not checked here."""
    problems = []
    for key, value in file_parameters(dsn):
        path = Path(value).expanduser()
        if path.is_absolute() and not path.is_file():
            problems.append(f"{where}: {key} {value}: " + ("a directory, expected a file" if path.is_dir()
                                                             else "file not found"))
    return problems


def _structure_sources(raw_sources: Any, origin: str, env: Mapping[str, str],
                       problems: list[str]) -> list[tuple[int, SourceConfig]]:
    if not isinstance(raw_sources, list):
        problems.append(f"{origin}: sources: expected [[sources]] tables")
        return []
    structured = []
    for i, raw in enumerate(raw_sources):
        where = f"sources[{i}]"
        if not isinstance(raw, Mapping):
            problems.append(f"{origin}: {where}: expected a table")
            continue
        expanded, found = expand_table(raw, where, env)
        problems.extend(f"{origin}: {p}" for p in found)
        if found:
            continue  # the values are not what the operator meant: checking them would only add noise
        if isinstance(expanded.get("kind"), str) and expanded["kind"] in PGWATCH_KINDS:
            expanded = {**expanded, "kind": PGWATCH_KINDS[expanded["kind"]]}
        try:
            structured.append((i, converter.structure(expanded, SourceConfig)))
        except Exception as e:
            lines, more = _format_cattrs_errors(e, where), list[str]()
            standing = stand_in(expanded, lambda t: converter.structure(t, SourceConfig), lines, where, more)
            problems.extend(f"{origin}: {line}" for line in lines + more)
            if standing is not None:
                structured.append((i, standing))
    return structured


def _structure_sinks(raw_sinks: Any, origin: str, env: Mapping[str, str], problems: list[str]) -> list[SinkConfig]:
    if not isinstance(raw_sinks, list):
        problems.append(f"{origin}: sinks: expected [[sinks]] tables")
        return []
    structured = []
    for i, raw in enumerate(raw_sinks):
        where = f"sinks[{i}]"
        if not isinstance(raw, Mapping):
            problems.append(f"{origin}: {where}: expected a table")
            continue
        expanded, found = expand_table(raw, where, env, keys=_SINK_EXPANDED)
        problems.extend(f"{origin}: {p}" for p in found)
        if found:
            continue
        try:
            structured.append(structure_sink(expanded))
        except Exception as e:
            if "unknown sink type" in str(e):
                problems.append(f"{origin}: {where}.type: {e}")
                continue
            lines, more = _format_cattrs_errors(e, where), list[str]()
            standing_sink = stand_in(expanded, structure_sink, lines, where, more)
            problems.extend(f"{origin}: {line}" for line in lines + more)
            if standing_sink is not None:
                structured.append(standing_sink)
    return structured


def _structure_fleet(raw: Any, origin: str, env: Mapping[str, str], problems: list[str]) -> FleetConfig | None:
    """`[fleet]` (reaper.daemon.fleet); the environment is expanded in its dsn, member and password_file."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"{origin}: fleet: expected a [fleet] table")
        return None
    expanded, found = expand_table(raw, "fleet", env, keys=_SINK_EXPANDED | {"member"})
    problems.extend(f"{origin}: {p}" for p in found)
    if found:
        return None
    try:
        fleet: FleetConfig = converter.structure(expanded, FleetConfig)
    except Exception as e:
        problems.extend(f"{origin}: {line}" for line in _format_cattrs_errors(e, "fleet"))
        return None
    if not re.match(r"^postgres(ql)?://", fleet.dsn):
        problems.append(f"{origin}: fleet.dsn: {DSN_EXPECTED}")
    remember_secrets(fleet.dsn)
    return fleet


def _structure_sources_from(raw_list: Any, origin: str, env: Mapping[str, str],
                            problems: list[str]) -> list[SourcesFromConfig]:
    if not isinstance(raw_list, list):
        problems.append(f"{origin}: sources_from: expected [[sources_from]] tables")
        return []
    structured: list[SourcesFromConfig] = []
    for i, raw in enumerate(raw_list):
        where = f"sources_from[{i}]"
        if not isinstance(raw, Mapping):
            problems.append(f"{origin}: {where}: expected a table")
            continue
        expanded, found = expand_table(raw, where, env, keys=_SINK_EXPANDED)
        problems.extend(f"{origin}: {p}" for p in found)
        if found:
            continue
        try:
            feed = converter.structure(expanded, SourcesFromConfig)
        except Exception as e:
            problems.extend(f"{origin}: {line}" for line in _format_cattrs_errors(e, where))
            continue
        if not re.match(r"^postgres(ql)?://", feed.dsn):
            problems.append(f"{origin}: {where}.dsn: {DSN_EXPECTED}")
        problems.extend(f"{origin}: {p}" for p in _check_file(
            f"{where}.password_file", feed.password_file, "a file holding the password"))
        if any(f.dsn == feed.dsn for f in structured):
            problems.append(f"{origin}: {where}.dsn: the same config database twice")
        structured.append(feed)
    return structured


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None,
                require_sinks: bool = True) -> Config:
    """Load and fully validate a config file. Raises ConfigError listing every problem.

    The result has its environment expanded and `collector.state_dir` filled in (default_state_dir)."""
    path = Path(path)
    env = os.environ if environ is None else environ
    origin = str(path)
    data = read_toml(path)
    problems: list[str] = []

    shipped = load_shipped_definitions()
    for table in ("metrics", "presets"):
        raw_table = data.get(table)
        for name in raw_table if isinstance(raw_table, Mapping) else ():
            problem = name_problem(name, f"a {table[:-1]} name")
            if problem:
                problems.append(f"{origin}: {table}.{name!r}: {problem}")
    own, def_problems = structure_definitions(data, origin)
    problems.extend(def_problems)
    all_metrics = {**shipped.metrics, **own.metrics}
    all_presets = {**shipped.presets, **own.presets}
    # a definition of the config's own that did not structure is named by its own lines, not "unknown" where used
    broken = {table: set(raw) - set(getattr(own, table)) for table in ("metrics", "presets")
              if isinstance(raw := data.get(table), Mapping)}
    metric_names = all_metrics.keys() | broken.get("metrics", set())
    for name, preset in own.presets.items():
        problems.extend(f"{origin}: {p}" for p in
                        _check_intervals(f"presets.{name}.metrics", preset.metrics, metric_names))
        problems.extend(f"{origin}: {p}" for p in
                        reference_problems(f"presets.{name}.top_n", _defined(preset.top_n, broken), all_metrics))

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"{origin}: {unknown_key(key, TOP_LEVEL_KEYS)}")
    base = config_folder(path)
    structured_sources = [(i, anchored(src, base)) for i, src in
                          _structure_sources(data.get("sources", []), origin, env, problems)]
    structured_sinks = [anchored(sink, base) for sink in _structure_sinks(data.get("sinks", []), origin, env, problems)]
    sources_from = [anchored(f, base) for f in _structure_sources_from(data.get("sources_from", []), origin, env,
                                                                        problems)]
    fleet = _structure_fleet(data.get("fleet"), origin, env, problems)
    fleet = None if fleet is None else anchored(fleet, base)
    collector = CollectorConfig()
    if "collector" in data:
        try:
            collector = anchored(converter.structure(data["collector"], CollectorConfig), base)
        except Exception as e:
            lines, more = _format_cattrs_errors(e, "collector"), list[str]()
            collector = anchored(stand_in(data["collector"], lambda t: converter.structure(t, CollectorConfig),
                                           lines, "collector", more) or collector, base)
            problems.extend(f"{origin}: {line}" for line in lines + more)
    if collector.state_dir is None:
        try:
            collector = attrs.evolve(collector, state_dir=default_state_dir(path, env))
        except ConfigError as e:  # no home directory to put it under
            problems.extend(f"{origin}: {line}" for line in e.problems)

    seen: dict[str, int] = {}
    for i, src in structured_sources:
        where = f"sources[{i}]"
        if src.name in seen:
            problems.append(f"{origin}: {where}.name: duplicate source name {src.name!r} "
                            f"(also sources[{seen[src.name]}])")
        else:
            seen[src.name] = i
        problems.extend(f"{origin}: {where}.{p}" for p in check_source(src)  # (not of a stand-in's dsn: said already)
                        if not (src.dsn == STAND_INS["dsn"] and p.startswith("dsn")))
        for key, preset_name in (("preset", src.preset), ("standby_preset", src.standby_preset)):
            if preset_name is not None and preset_name not in all_presets.keys() | broken.get("presets", set()):
                problems.append(f"{origin}: {where}.{key}: unknown preset {preset_name!r} "
                                f"(known: {', '.join(sorted(all_presets))})")
        problems.extend(f"{origin}: {p}" for p in _check_intervals(f"{where}.metrics", src.metrics, metric_names))
        problems.extend(f"{origin}: {p}" for p in
                        _check_intervals(f"{where}.standby_metrics", src.standby_metrics, metric_names))
        problems.extend(f"{origin}: {p}" for p in
                        _check_file(f"{where}.password_file", src.password_file, "a file holding the password"))
        problems.extend(f"{origin}: {p}" for p in _dsn_files(f"{where}.dsn", src.dsn))
        problems.extend(f"{origin}: {p}" for p in reference_problems(
            f"{where}.top_n", _defined(src.top_n, broken), all_metrics,
            [all_presets.get(src.preset or ""), all_presets.get(src.standby_preset or "")]))
    sources = tuple(src for _, src in structured_sources)
    for dsn in [src.dsn for src in sources] + [k.dsn for k in structured_sinks if isinstance(k, PostgresSinkConfig)] \
            + [f.dsn for f in sources_from]:
        remember_secrets(dsn)  # every config read (a reload too): no log line or error text shows these passwords

    labels: dict[str, int] = {}
    for i, sink in enumerate(structured_sinks):
        if isinstance(sink, PostgresSinkConfig):
            if not re.match(r"^postgres(ql)?://", sink.dsn):
                problems.append(f"{origin}: sinks[{i}].dsn: {DSN_EXPECTED}")
            problems.extend(f"{origin}: {p}" for p in _check_file(
                f"sinks[{i}].password_file", sink.password_file, "a file holding the password"))
            problems.extend(f"{origin}: {p}" for p in _dsn_files(f"sinks[{i}].dsn", sink.dsn))
        if isinstance(sink, JsonFileSinkConfig) and sink.path != "-" and Path(sink.path).is_dir():
            problems.append(f"{origin}: sinks[{i}].path: {sink.path} is a directory, expected a file to write")
        if sink.label in labels:
            problems.append(f"{origin}: sinks[{i}]: duplicate sink {sink.label!r} (also sinks[{labels[sink.label]}])")
        labels[sink.label] = i
    problems.extend(f"{origin}: {p}" for p in _clashes(structured_sinks, collector.http_listen))
    sinks = tuple(structured_sinks)
    if require_sinks and not sinks and not any("sinks" in p for p in problems):
        problems.append(f"{origin}: sinks: at least one [[sinks]] table is required")
    if collector.state_dir is not None and Path(collector.state_dir).exists() \
            and not Path(collector.state_dir).is_dir():
        problems.append(f"{origin}: collector.state_dir: {collector.state_dir} exists and is not a directory")

    if problems:
        raise ConfigError(problems)
    return Config(sources=sources, sinks=sinks, metrics=own.metrics, presets=own.presets,
                  collector=collector, path=origin, sources_from=tuple(sources_from), fleet=fleet)


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "[::]", "*"})


def _clashes(sinks: Collection[Any], http_listen: str | None) -> list[str]:
    """Sinks that would write one file (two writers, each rotating it under the other: lines lost) or listen
    on one port (the second can never open), whatever their names and however their paths are spelt."""
    problems: list[str] = []
    files: dict[str, str] = {}
    ports: list[tuple[str, str, str]] = [] if http_listen is None else [(*_host_port(http_listen),
                                                                          "collector.http_listen")]
    labels: set[str] = set()
    for i, sink in enumerate(sinks):
        if sink.label in labels:  # a duplicate sink: said as such
            continue
        labels.add(sink.label)
        if isinstance(sink, JsonFileSinkConfig):
            target = "-" if sink.path == "-" else os.path.realpath(os.path.expanduser(sink.path))
            if target in files:
                what = "standard output" if target == "-" else f"the file {target}"
                problems.append(f"sinks[{i}].path: {what} is written by {files[target]} already "
                                "(two writers of one file lose lines; give each sink its own file)")
            files.setdefault(target, f"sinks[{i}]")
        elif isinstance(sink, PrometheusSinkConfig):
            host, port = _host_port(sink.listen)
            for other_host, other_port, where in ports:
                if port == other_port != "0" and (host == other_host or WILDCARD_HOSTS & {host, other_host}):
                    problems.append(f"sinks[{i}].listen: {sink.listen} takes the port {where} listens on already "
                                    "(only one of them could open; give each its own port)")
                    break
            ports.append((host, port, f"sinks[{i}]"))
    return problems


def _host_port(listen: str) -> tuple[str, str]:
    host, _, port = listen.rpartition(":")
    return host, str(int(port))


# The fields naming a file or folder: a relative one is taken from the config file's folder, wherever the
# daemon was started (systemd starts it in /: `path = "out/m.ndjson"` wrote /out/m.ndjson, or failed).
PATH_FIELDS = frozenset({"password_file", "path", "state_dir", "pause_file", "pgbackrest_config", "walg_config",
                         "walg_env_file"})


def anchored(obj: Any, base: Path) -> Any:
    """A config table (attrs) with its relative paths (PATH_FIELDS, its nested tables' too) made absolute against
    `base`, and "~/..." against the home directory (it was taken as a folder named "~" in the daemon's working
    directory); "-" (stdout) stays as it is."""
    changes: dict[str, Any] = {}
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if field.name in PATH_FIELDS and isinstance(value, str):
            if value.startswith("~"):
                changes[field.name] = os.path.expanduser(value)
            elif value and value != "-" and not os.path.isabs(value):
                changes[field.name] = str(base / value)
        elif attrs.has(type(value)):
            inner = anchored(value, base)
            if inner is not value:
                changes[field.name] = inner
    return attrs.evolve(obj, **changes) if changes else obj


def config_folder(path: str | Path) -> Path:
    return Path(os.path.abspath(path)).parent


def load_state_dir(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Path:
    """Where the daemon run with this config keeps its state: `[collector] state_dir`, else the default.

    Reads only that one key: no sources, no environment expansion, no secrets needed (for `reaper
    status` and `reaper reload`). Raises ConfigError (one line) when the file or the key is unusable."""
    path = Path(path)
    env = os.environ if environ is None else environ
    data = read_toml(path)
    collector = data.get("collector", {})
    if not isinstance(collector, Mapping):
        raise ConfigError([f"{path}: collector: expected a table"])
    state_dir = collector.get("state_dir")
    if state_dir is None:
        try:
            return Path(default_state_dir(path, env))
        except ConfigError as e:  # no home directory to put it under
            raise ConfigError([f"{path}: {line}" for line in e.problems]) from None
    if not isinstance(state_dir, str) or not state_dir.strip():
        raise ConfigError([f"{path}: collector.state_dir: must not be empty (leave the key out for the default)"])
    if state_dir.startswith("~"):
        return Path(state_dir).expanduser()
    return Path(state_dir) if os.path.isabs(state_dir) else config_folder(path) / state_dir
