"""Configuration schema: frozen attrs models and the one cattrs converter. No I/O.

Reading a file, expanding the environment and checking references live in reaper.config.load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NewType

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from reaper.config.redact import redact_dsn

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
    from reaper.db.storage_schema import parse_partition_interval

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


