"""Metric definitions and presets: the shipped files under presets/, overlaid by a config's own.

Pure: reads the definition files once and answers questions about them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import attrs

from reaper.catalog.definitions import structure_definitions
from reaper.config.files import read_toml
from reaper.config.schema import Config, Definitions, MetricDef, PresetDef, SourceConfig
from reaper.config.topn import reference_problems
from reaper.errors import ConfigError
from reaper.special.registry import COLLECTED

# Metrics collected by reaper's own code rather than by SQL (the one table: reaper/special/registry.py).
SPECIAL_METRICS = COLLECTED
DEFAULT_PRESET = "basic"


def presets_dir() -> Path:
    """Where the shipped definitions live: inside the wheel, or at the top of a source checkout."""
    package = Path(__file__).resolve().parent.parent  # reaper/
    for candidate in (package / "presets", package.parent / "presets"):
        if candidate.is_dir():
            return candidate
    raise ConfigError([f"{package}: the shipped presets/ directory is missing (broken installation)"])


@functools.cache
def load_shipped_definitions() -> Definitions:
    """The definitions shipped in presets/. Their SQL texts are not linted here (80 of the ~130 ms this takes,
    at every start of the daemon and of most commands): they are part of the release, and the test suite
    lints every one of them (tests/test_metric_lint.py)."""
    return load_definition_dir(presets_dir(), check_sql=False)


def load_definition_dir(directory: Path, *, check_sql: bool = True) -> Definitions:
    """Load every *.toml under a directory; a name defined twice is an error."""
    metrics: dict[str, MetricDef] = {}
    presets: dict[str, PresetDef] = {}
    origins: dict[str, Path] = {}
    problems: list[str] = []
    for path in sorted(directory.glob("*.toml")):
        try:
            data = read_toml(path)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        extra = sorted(set(data) - {"metrics", "presets"})
        problems.extend(f"{path}: {key}: unknown key (expected metrics, presets)" for key in extra)
        defs, found = structure_definitions(data, str(path), check_sql=check_sql)
        problems.extend(found)
        for key in [f"metrics.{n}" for n in defs.metrics] + [f"presets.{n}" for n in defs.presets]:
            if key in origins:
                problems.append(f"{path}: {key}: already defined in {origins[key]}")
            origins[key] = path
        metrics.update(defs.metrics)
        presets.update(defs.presets)
    for name, preset in presets.items():
        for metric in preset.metrics:
            if metric not in metrics:
                problems.append(f"{origins['presets.' + name]}: presets.{name}.metrics.{metric}: unknown metric")
        problems.extend(f"{origins['presets.' + name]}: {p}"
                        for p in reference_problems(f"presets.{name}.top_n", preset.top_n, metrics))
    if problems:
        raise ConfigError(problems)
    return Definitions(metrics=metrics, presets=presets)


@attrs.frozen
class Catalog:
    """Every metric and preset a config can use: the shipped ones overlaid by the config's own."""

    metrics: Mapping[str, MetricDef]
    presets: Mapping[str, PresetDef]

    @classmethod
    def for_config(cls, config: Config | None = None) -> Catalog:
        shipped = load_shipped_definitions()
        if config is None:
            return cls(metrics=shipped.metrics, presets=shipped.presets)
        return cls(metrics={**shipped.metrics, **config.metrics}, presets={**shipped.presets, **config.presets})

    def intervals(self, source: SourceConfig, *, standby: bool) -> dict[str, int]:
        """Metric -> interval seconds for a source in the given role; disabled ones (0) left out.

        The primary set is the preset (default `basic` when neither a preset nor metrics are given)
        overlaid by the source's own `metrics`. In recovery the standby set is used when the source
        defines one; otherwise the primary set. Metrics whose node_status excludes the role are dropped.
        """
        if standby and (source.standby_preset or source.standby_metrics):
            preset, overlay = source.standby_preset, source.standby_metrics
        else:
            preset, overlay = source.preset, source.metrics
            if preset is None and not overlay:
                preset = DEFAULT_PRESET
        merged: dict[str, int] = {}
        if preset is not None:
            merged.update(self.presets[preset].metrics)
        merged.update(overlay)
        role = "standby" if standby else "primary"
        kind = source.kind if source.kind in ("pgbouncer", "pgpool") else "postgres"
        result = {}
        for name, seconds in merged.items():
            metric = self.metrics.get(name)
            if seconds <= 0 or metric is None or (kind not in metric.source_kinds and name != "instance_up"):
                continue
            if metric.node_status is not None and metric.node_status != role:
                continue
            result[name] = seconds
        return result
