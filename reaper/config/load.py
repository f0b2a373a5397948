"""Loading a configuration: reading TOML, `${NAME}` expansion, redaction and `load_config(path)`.

Every problem is reported as one line `FILE: key.path: what is wrong`, all problems at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import attrs

from reaper.catalog.definitions import structure_definitions
from reaper.catalog.metrics import load_shipped_definitions
from reaper.config.files import read_toml
from reaper.config.schema import (
    CollectorConfig,
    Config,
    JsonFileSinkConfig,
    MetricDef,
    PostgresSinkConfig,
    SinkConfig,
    SourceConfig,
    _format_cattrs_errors,
    converter,
    structure_sink,
)
from reaper.errors import ConfigError
from reaper.kinds import check_source

# ---------------------------------------------------------------------------------------------
# Environment expansion and redaction

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace `${NAME}` with the environment's value; return the text and the missing names."""
    missing: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in environ:
            missing.append(name)
            return m.group(0)
        return environ[name]

    return _ENV_RE.sub(repl, text), missing


# ---------------------------------------------------------------------------------------------
# Loading


def _check_intervals(where: str, intervals: Mapping[str, int], known: Mapping[str, MetricDef]) -> list[str]:
    problems = []
    for metric, seconds in intervals.items():
        if metric not in known:
            problems.append(f"{where}.{metric}: unknown metric")
        if seconds < 0:
            problems.append(f"{where}.{metric}: interval must be 0 (disabled) or more seconds")
    return problems


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None,
                require_sinks: bool = True) -> Config:
    """Load and fully validate a config file. Raises ConfigError listing every problem."""
    path = Path(path)
    env = os.environ if environ is None else environ
    origin = str(path)
    data = read_toml(path)
    problems: list[str] = []

    shipped = load_shipped_definitions()
    own, def_problems = structure_definitions(data, origin)
    problems.extend(def_problems)
    all_metrics = {**shipped.metrics, **own.metrics}
    all_presets = {**shipped.presets, **own.presets}
    for name, preset in own.presets.items():
        problems.extend(f"{origin}: {p}" for p in
                        _check_intervals(f"presets.{name}.metrics", preset.metrics, all_metrics))

    rest = {k: v for k, v in data.items() if k not in ("metrics", "presets")}
    sources: tuple[SourceConfig, ...] = ()
    sinks: tuple[SinkConfig, ...] = ()
    collector = CollectorConfig()
    allowed = {"sources", "sinks", "collector"}
    for key in rest:
        if key not in allowed:
            problems.append(f"{origin}: {key}: unknown key (expected sources, sinks, collector, metrics, presets)")
    raw_sources = rest.get("sources", [])
    if not isinstance(raw_sources, list):
        problems.append(f"{origin}: sources: expected [[sources]] tables")
        raw_sources = []
    structured_sources = []
    for i, raw in enumerate(raw_sources):
        try:
            structured_sources.append((i, converter.structure(raw, SourceConfig)))
        except Exception as e:
            problems.extend(f"{origin}: {line}" for line in _format_cattrs_errors(e, f"sources[{i}]"))
    raw_sinks = rest.get("sinks", [])
    if not isinstance(raw_sinks, list):
        problems.append(f"{origin}: sinks: expected [[sinks]] tables")
        raw_sinks = []
    structured_sinks = []
    for i, raw in enumerate(raw_sinks):
        try:
            structured_sinks.append(structure_sink(raw))
        except (TypeError, ValueError) as e:
            problems.append(f"{origin}: sinks[{i}].type: {e}" if "sink type" in str(e)
                            else f"{origin}: sinks[{i}]: {e}")
        except Exception as e:
            problems.extend(f"{origin}: {line}" for line in _format_cattrs_errors(e, f"sinks[{i}]"))
    if "collector" in rest:
        try:
            collector = converter.structure(rest["collector"], CollectorConfig)
        except Exception as e:
            problems.extend(f"{origin}: {line}" for line in _format_cattrs_errors(e, "collector"))

    seen: dict[str, int] = {}
    checked_sources = []
    for i, src in structured_sources:
        where = f"sources[{i}]"
        if not src.name.strip():
            problems.append(f"{origin}: {where}.name: must not be empty")
        elif src.name in seen:
            problems.append(f"{origin}: {where}.name: duplicate source name {src.name!r} "
                            f"(also sources[{seen[src.name]}])")
        else:
            seen[src.name] = i
        dsn, missing = expand_env(src.dsn, env)
        for var in missing:
            problems.append(f"{origin}: {where}.dsn: environment variable {var} is not set")
        problems.extend(f"{origin}: {where}.{p}" for p in check_source(attrs.evolve(src, dsn=dsn)))
        for key, preset_name in (("preset", src.preset), ("standby_preset", src.standby_preset)):
            if preset_name is not None and preset_name not in all_presets:
                problems.append(f"{origin}: {where}.{key}: unknown preset {preset_name!r} "
                                f"(known: {', '.join(sorted(all_presets))})")
        problems.extend(f"{origin}: {p}" for p in _check_intervals(f"{where}.metrics", src.metrics, all_metrics))
        problems.extend(f"{origin}: {p}" for p in
                        _check_intervals(f"{where}.standby_metrics", src.standby_metrics, all_metrics))
        if src.connect_timeout_seconds <= 0:
            problems.append(f"{origin}: {where}.connect_timeout_seconds: must be more than 0")
        if src.query_timeout_seconds <= 0:
            problems.append(f"{origin}: {where}.query_timeout_seconds: must be more than 0")
        checked_sources.append(attrs.evolve(src, dsn=dsn))
    sources = tuple(checked_sources)

    for i, sink in enumerate(structured_sinks):
        if isinstance(sink, PostgresSinkConfig):
            dsn, missing = expand_env(sink.dsn, env)
            for var in missing:
                problems.append(f"{origin}: sinks[{i}].dsn: environment variable {var} is not set")
            if not re.match(r"^postgres(ql)?://", dsn):
                problems.append(f"{origin}: sinks[{i}].dsn: expected a URI starting with postgresql://")
            structured_sinks[i] = attrs.evolve(sink, dsn=dsn)
    labels: dict[str, int] = {}
    for i, sink in enumerate(structured_sinks):
        if isinstance(sink, JsonFileSinkConfig) and not sink.path.strip():
            problems.append(f"{origin}: sinks[{i}].path: must not be empty (use \"-\" for stdout)")
        if sink.label in labels:
            problems.append(f"{origin}: sinks[{i}]: duplicate sink {sink.label!r} (also sinks[{labels[sink.label]}])")
        labels[sink.label] = i
    sinks = tuple(structured_sinks)
    if require_sinks and not sinks and not any("sinks" in p for p in problems):
        problems.append(f"{origin}: sinks: at least one [[sinks]] table is required")
    if collector.queue_capacity < 1:
        problems.append(f"{origin}: collector.queue_capacity: must be 1 or more")
    if collector.shutdown_grace_seconds < 0:
        problems.append(f"{origin}: collector.shutdown_grace_seconds: must be 0 or more")
    if collector.max_backoff_seconds < 1:
        problems.append(f"{origin}: collector.max_backoff_seconds: must be 1 or more")

    if problems:
        raise ConfigError(problems)
    return Config(sources=sources, sinks=sinks, metrics=own.metrics, presets=own.presets,
                  collector=collector, path=origin)
