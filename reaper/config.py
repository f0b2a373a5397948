"""Configuration: frozen attrs models, the one cattrs converter, and `load_config(path)`.

Pure: the only I/O is reading the config file (and the environment for `${NAME}` in a dsn).
Every problem is reported as one line `FILE: key.path: what is wrong`, all problems at once.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NewType
from urllib.parse import urlsplit, urlunsplit

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from reaper.errors import ConfigError

NodeStatus = Literal["primary", "standby"]
SourceKind = Literal["postgres", "pgbouncer", "pgpool"]
NameList = NewType("NameList", tuple[str, ...])  # in TOML: one name, or a list of names


@attrs.frozen
class MetricDef:
    """One metric: SQL keyed by minimum PostgreSQL major version, plus how to treat its columns."""

    description: str = ""
    sql: dict[int, str] = attrs.field(factory=dict)
    gauges: tuple[str, ...] = ()
    node_status: NodeStatus | None = None
    storage_name: str | None = None
    instance_level: bool = False
    statement_timeout_seconds: float | None = None
    requires_extension: NameList = NameList(())
    special: bool = False
    init_sql: str | None = None
    columns: tuple[str, ...] = ()
    source_kinds: tuple[SourceKind, ...] = ("postgres",)
    name: str = ""

    @property
    def table(self) -> str:
        """The name measurements are stored under (storage_name, or the metric's own name)."""
        return self.storage_name or self.name

    def sql_for(self, major: int) -> str | None:
        """The SQL for a server of this major version: the largest key <= major, else None."""
        keys = [k for k in self.sql if k <= major]
        return self.sql[max(keys)] if keys else None

    def is_gauge(self, column: str) -> bool:
        return "*" in self.gauges or column in self.gauges


@attrs.frozen
class PresetDef:
    description: str = ""
    metrics: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen
class SourceConfig:
    name: str
    dsn: str
    kind: Literal["postgres", "postgres-discovery", "pgbouncer", "pgpool", "patroni"] = "postgres"
    preset: str | None = None
    metrics: dict[str, int] = attrs.field(factory=dict)
    standby_preset: str | None = None
    standby_metrics: dict[str, int] = attrs.field(factory=dict)
    tags: dict[str, str] = attrs.field(factory=dict)
    enabled: bool = True
    group: str = "default"
    include_pattern: str | None = None  # discovery kinds: databases to monitor (regex)
    exclude_pattern: str | None = None  # discovery kinds: databases to leave out (regex)
    discovery_interval_seconds: float = 120.0  # discovery kinds: how often the list is refreshed
    only_if_primary: bool = False  # collect only while the server is a primary (not in recovery)
    password_file: str | None = None
    connect_timeout_seconds: float = 5.0
    query_timeout_seconds: float = 30.0

    @property
    def redacted_dsn(self) -> str:
        return redact_dsn(self.dsn)

    def connection_settings(self) -> tuple[Any, ...]:
        """What, when changed, needs a new connection (as opposed to an in-place update)."""
        return (self.dsn, self.kind, self.password_file, self.connect_timeout_seconds,
                self.query_timeout_seconds)


@attrs.frozen
class JsonFileSinkConfig:
    path: str
    type: Literal["jsonfile"] = "jsonfile"
    name: str = ""
    max_bytes: int | None = None  # rotate when the file would grow past this size
    backups: int = 5  # rotated files kept: path.1 (newest) .. path.N

    @property
    def label(self) -> str:
        return self.name or f"jsonfile:{self.path}"


def _check_partition_interval(_instance: Any, _attribute: Any, value: str) -> None:
    """The width of the storage's time partitions: "1 hour" .. "1 week" (ValueError says what is wrong)."""
    from reaper.storage_schema import parse_partition_interval

    parse_partition_interval(value)


@attrs.frozen
class PostgresSinkConfig:
    """pgwatch-compatible storage: one table per metric, time partitions, the admin schema."""

    dsn: str
    type: Literal["postgres"] = "postgres"
    name: str = ""
    password_file: str | None = None
    batching_delay_seconds: float = 0.95  # flush at least this often
    batch_size: int = 256  # ... or as soon as this many measurements are waiting
    # width of the time partitions: "1 hour" .. "1 week"
    partition_interval: str = attrs.field(default="1 day", validator=_check_partition_interval)
    retention_days: int = 14  # partitions older than this are dropped; 0 keeps everything
    maintenance_interval_seconds: float = 43200.0  # how often retention and upkeep run
    connect_timeout_seconds: float = 10.0
    write_timeout_seconds: float = 60.0

    @property
    def label(self) -> str:
        return self.name or f"postgres:{redact_dsn(self.dsn)}"


@attrs.frozen
class PrometheusSinkConfig:
    """An HTTP endpoint for Prometheus to scrape: the latest sample of every series."""

    listen: str = "127.0.0.1:9187"
    type: Literal["prometheus"] = "prometheus"
    name: str = ""
    namespace: str = "pgwatch"
    timestamps: bool = False  # attach each sample's own time (pgwatch does; it makes long intervals go stale)
    stale_after_seconds: float = 900.0  # a series not refreshed for this long is dropped from the endpoint

    @property
    def label(self) -> str:
        return self.name or f"prometheus:{self.listen}"


SinkConfig = JsonFileSinkConfig | PostgresSinkConfig | PrometheusSinkConfig
SINK_TYPES: dict[str, type[Any]] = {
    "jsonfile": JsonFileSinkConfig,
    "postgres": PostgresSinkConfig,
    "prometheus": PrometheusSinkConfig,
}


@attrs.frozen
class CollectorConfig:
    queue_capacity: int = 10_000
    shutdown_grace_seconds: float = 10.0
    max_backoff_seconds: float = 60.0
    state_dir: str | None = None  # status file and spill queues; default: see default_state_dir()
    spill_max_bytes: int = 1024**3  # per sink: the on-disk queue a slow or dead sink fills
    pause_file: str | None = None  # while this file exists, no source queries its server
    min_db_size_mb: int = 0  # sources whose database is smaller than this are not collected
    instance_cache_max_seconds: float = 30.0  # instance-level metrics shared between sources; 0 disables
    create_extensions: tuple[str, ...] = ()  # opt-in: CREATE EXTENSION these on primaries where missing


def default_state_dir(environ: Mapping[str, str] | None = None) -> str:
    """$STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/reaper for root, else ~/.local/state/reaper."""
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/reaper"
    return str(Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "reaper")


@attrs.frozen
class Config:
    sources: tuple[SourceConfig, ...] = ()
    sinks: tuple[SinkConfig, ...] = ()
    metrics: dict[str, MetricDef] = attrs.field(factory=dict)
    presets: dict[str, PresetDef] = attrs.field(factory=dict)
    collector: CollectorConfig = attrs.field(factory=CollectorConfig)
    path: str = ""


@attrs.frozen
class Definitions:
    """The contents of a metric/preset definition file (presets/*.toml, or the same keys in a config)."""

    metrics: dict[str, MetricDef] = attrs.field(factory=dict)
    presets: dict[str, PresetDef] = attrs.field(factory=dict)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def structure_float(value: Any, _type: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)

    def structure_int(value: Any, _type: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected a whole number, got {value!r}")
        return value

    def structure_str(value: Any, _type: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value

    def structure_bool(value: Any, _type: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value

    def structure_sql(value: Any, _type: Any) -> dict[int, str]:
        # TOML table keys are strings: the SQL table is keyed by minimum major version.
        if not isinstance(value, Mapping):
            raise TypeError("expected a table of minimum major version -> SQL")
        result = {}
        for key, sql in value.items():
            if not re.fullmatch(r"\d+", str(key)):
                raise ValueError(f"version key {key!r} is not a whole number")
            result[int(key)] = structure_str(sql, str)
        return result

    def structure_names(value: Any, _type: Any) -> NameList:
        if isinstance(value, str):
            return NameList((value,))
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return NameList(tuple(value))
        raise TypeError(f"expected a name or a list of names, got {value!r}")

    conv.register_structure_hook(NameList, structure_names)
    conv.register_structure_hook(float, structure_float)
    conv.register_structure_hook(int, structure_int)
    conv.register_structure_hook(str, structure_str)
    conv.register_structure_hook(bool, structure_bool)
    conv.register_structure_hook_func(lambda t: t == dict[int, str], structure_sql)
    return conv


def structure_sink(raw: Any) -> SinkConfig:
    """Structure one [[sinks]] table, dispatching on its `type`."""
    if not isinstance(raw, Mapping):
        raise TypeError("expected a [[sinks]] table")
    kind = raw.get("type")
    if kind not in SINK_TYPES:
        known = ", ".join(sorted(SINK_TYPES))
        raise ValueError(f"unknown sink type {kind!r} (known: {known})")
    result: SinkConfig = converter.structure(raw, SINK_TYPES[kind])
    return result


converter = _make_converter()


# ---------------------------------------------------------------------------------------------
# Error formatting


def _format_cattrs_errors(exc: BaseException, path: str = "") -> list[str]:
    """Flatten cattrs' nested exception groups into `key.path: message` lines."""
    lines: list[str] = []
    if isinstance(exc, ClassValidationError | IterableValidationError):
        with_notes, without = exc.group_exceptions()
        sub: BaseException
        for sub, note in with_notes:
            name = note.name if hasattr(note, "name") else getattr(note, "index", "")
            if isinstance(name, int):
                sub_path = f"{path}[{name}]"
            else:  # an attribute or a mapping key
                sub_path = f"{path}.{name}" if path else str(name)
            lines.extend(_format_cattrs_errors(sub, sub_path))
        for sub in without:
            lines.extend(_format_cattrs_errors(sub, path))
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            where = f"{path}.{key}" if path else key
            lines.append(f"{where}: unknown key")
    elif isinstance(exc, KeyError):
        lines.append(f"{path}: required")
    elif isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            lines.extend(_format_cattrs_errors(sub, path))
    else:
        message = str(exc) or exc.__class__.__name__
        literal = re.fullmatch(r"(.*) not in literal typing\.Literal\[(.*)\]", message)
        if literal:
            choices = ", ".join(c.strip().strip("'") for c in literal.group(2).split(","))
            message = f"{literal.group(1)!r} is not one of: {choices}"
        lines.append(f"{path}: {message}")
    return lines


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


def redact_dsn(dsn: str) -> str:
    """The dsn with any password replaced by `***`, safe for logs."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable dsn>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostinfo}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# ---------------------------------------------------------------------------------------------
# Loading


def read_text(path: Path, what: str = "file") -> str:
    """Read a UTF-8 text file, turning every failure into a one-line ConfigError."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, expected a {what}"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason})"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a one-line ConfigError."""
    text = read_text(path, "TOML file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: invalid TOML: {e}"]) from None


def structure_definitions(data: Mapping[str, Any], origin: str) -> tuple[Definitions, list[str]]:
    """Structure `metrics` and `presets` tables; return them and the problems found."""
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
        problems.extend(f"{origin}: {line}" for line in check_metric(metric))
        metrics[name] = metric
    for name, raw in raw_presets.items():
        try:
            presets[name] = converter.structure(raw, PresetDef)
        except Exception as e:
            problems.extend(f"{origin}: {line}" for line in _format_cattrs_errors(e, f"presets.{name}"))
    return Definitions(metrics=metrics, presets=presets), problems


def check_metric(metric: MetricDef) -> list[str]:
    """Problems with one metric definition on its own (not its references)."""
    where = f"metrics.{metric.name}"
    problems = []
    if not metric.special and not metric.sql:
        problems.append(f"{where}.sql: required (a table of minimum major version -> SQL)")
    if metric.special and metric.sql:
        problems.append(f"{where}.sql: a special metric is collected by reaper itself and takes no SQL")
    for version, sql in metric.sql.items():
        if version < 0:
            problems.append(f"{where}.sql.{version}: version must be 0 or more")
        text = sql.strip()
        if not text:
            problems.append(f"{where}.sql.{version}: empty SQL")
        elif text.endswith(";"):
            problems.append(f"{where}.sql.{version}: remove the trailing semicolon (one SELECT/WITH query)")
        elif "postgres" in metric.source_kinds and not re.match(
                r"(?is)^(\s|--[^\n]*\n|/\*.*?\*/)*(select|with)\b", sql):
            problems.append(f"{where}.sql.{version}: must be one SELECT or WITH query")
    if metric.statement_timeout_seconds is not None and metric.statement_timeout_seconds <= 0:
        problems.append(f"{where}.statement_timeout_seconds: must be more than 0")
    return problems


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
    from reaper.kinds import check_source  # late: these import this module
    from reaper.metrics import load_shipped_definitions

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
