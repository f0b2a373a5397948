"""Configuration schema: frozen attrs models (sinks in reaper.config.sinks) and the one cattrs converter. No I/O.

Reading a file, expanding the environment and checking references live in reaper.config.load.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NewType

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from reaper.config import rules
from reaper.config.redact import redact_dsn
from reaper.config.sinks import (
    SINK_TYPES,
    JsonFileSinkConfig,
    PostgresSinkConfig,
    PrometheusSinkConfig,
    SinkConfig,
)
from reaper.config.topn import ROWS_FOLDED, TopN
from reaper.errors import ConfigError

NodeStatus = Literal["primary", "standby"]
SourceKind = Literal["postgres", "pgbouncer", "pgpool"]
NameList = NewType("NameList", tuple[str, ...])  # in TOML: one name, or a list of names


@attrs.frozen
class MetricDef:
    """One metric: SQL keyed by minimum PostgreSQL major version, plus how to treat its columns."""

    description: str = ""
    sql: dict[int, str] = attrs.field(factory=dict, validator=rules.sql_texts)
    gauges: tuple[str, ...] = ()
    node_status: NodeStatus | None = None
    storage_name: str | None = None
    instance_level: bool = False
    statement_timeout_seconds: float | None = attrs.field(
        default=None, validator=rules.seconds(0.001, above=False, optional=True))
    requires_extension: NameList = NameList(())
    special: bool = False
    init_sql: str | None = attrs.field(default=None, validator=rules.sql_texts)
    columns: tuple[str, ...] = ()
    source_kinds: tuple[SourceKind, ...] = ("postgres",)
    name: str = ""
    budget_exempt: bool = False  # never stretched by a source's server budget (reaper.daemon.cost)
    heavy: bool = False  # skipped while a source's pause_when_active_backends_over is exceeded
    top_n: TopN | None = None  # keep the N leading rows, fold the rest into one `other` row (reaper.config.topn)

    @property
    def table(self) -> str:
        """The name measurements are stored under (storage_name, or the metric's own name)."""
        return self.storage_name or self.name

    def sql_for(self, major: int) -> str | None:
        """The SQL for a server of this major version: the largest key <= major, else None."""
        keys = [k for k in self.sql if k <= major]
        return self.sql[max(keys)] if keys else None

    def is_gauge(self, column: str) -> bool:
        return "*" in self.gauges or column in self.gauges or column == ROWS_FOLDED


@attrs.frozen
class PresetDef:
    description: str = ""
    metrics: dict[str, int] = attrs.field(factory=dict, validator=rules.intervals)
    top_n: dict[str, TopN] = attrs.field(factory=dict)  # metric -> its top_n in this preset


def _check_command_prefix(_instance: Any, _attribute: Any, value: str) -> None:
    try:
        shlex.split(value)
    except ValueError as e:
        raise rules.FieldValueError(f"cannot be split into words like a shell command line ({e})") from None


@attrs.frozen
class SpecialsConfig:
    """A source's `[sources.specials]` table: how the metrics that run host tools (pgBackRest, WAL-G,
    smartctl; reaper.special.backup and .smart) reach them. Empty: run them here, on the server's host."""

    command_prefix: str = attrs.field(default="", validator=_check_command_prefix)  # "sudo -n -u postgres"
    pgbackrest_stanza: str | None = None  # None: the one stanza `pgbackrest info` lists
    pgbackrest_config: str | None = attrs.field(default=None, validator=rules.optional_path)
    walg_config: str | None = attrs.field(default=None, validator=rules.optional_path)
    walg_env_file: str | None = attrs.field(default=None, validator=rules.optional_path)  # KEY=VALUE lines
    walg_env: dict[str, str] = attrs.field(factory=dict)  # WALG_*, AWS_* ... for wal-g only


# pgwatch's names of the kinds whose reaper name differs: a [[sources]] table may use either
PGWATCH_KINDS = {
    "postgres-continuous-discovery": "postgres-discovery",
    "patroni-continuous-discovery": "patroni",
    "patroni-namespace-discovery": "patroni",
}


# SourceConfig fields sent at connect: a reload that changes one reconnects the source (reaper.daemon.plan)
CONNECTION_FIELDS = ("dsn", "kind", "password_file", "connect_timeout_seconds", "query_timeout_seconds",
                     "lock_timeout_seconds", "search_path")


@attrs.frozen
class SourceConfig:
    name: str = attrs.field(validator=rules.name())
    dsn: str = attrs.field(converter=rules.uri_dsn, validator=rules.source_dsn)
    kind: Literal["postgres", "postgres-discovery", "pgbouncer", "pgpool", "patroni"] = "postgres"
    preset: str | None = None
    metrics: dict[str, int] = attrs.field(factory=dict, validator=rules.intervals)
    standby_preset: str | None = None
    standby_metrics: dict[str, int] = attrs.field(factory=dict, validator=rules.intervals)
    tags: dict[str, str] = attrs.field(factory=dict, validator=rules.tags)
    enabled: bool = True
    group: str = attrs.field(default="default", validator=rules.name(what="a group name"))
    # discovery kinds: databases to monitor, and to leave out (PostgreSQL regular expressions)
    include_pattern: str | None = attrs.field(default=None, validator=rules.pattern)
    exclude_pattern: str | None = attrs.field(default=None, validator=rules.pattern)
    # discovery kinds: how often the list is refreshed
    discovery_interval_seconds: float = attrs.field(default=120.0, validator=rules.seconds(1.0, above=False))
    only_if_primary: bool = False  # collect only while the server is a primary (not in recovery)
    password_file: str | None = attrs.field(default=None, validator=rules.optional_path)
    connect_timeout_seconds: float = attrs.field(default=5.0, validator=rules.seconds())
    # one tick's deadline, and the server-side statement_timeout (whole milliseconds: at least 1 ms)
    query_timeout_seconds: float = attrs.field(default=30.0, validator=rules.seconds(0.001, above=False))
    # the server-side lock_timeout: a metric waiting for a table lock (a migration's, a VACUUM FULL's) fails after
    # it instead of holding the tick's whole statement, and never queues in front of the server's own work; 0: off
    lock_timeout_seconds: float = attrs.field(default=1.0, validator=rules.seconds(0.0, above=False))
    # where the metrics' unqualified names are looked up, after pg_catalog and before the extensions' schemas
    # (reaper.db.PIN_SEARCH_PATH): never the database's or role's own search_path, which their owner controls
    search_path: tuple[str, ...] = attrs.field(default=("public",), validator=rules.schemas)
    specials: SpecialsConfig = attrs.field(factory=SpecialsConfig)  # host tools: reaper.special.backup, .smart
    top_n: dict[str, TopN] = attrs.field(factory=dict)  # metric -> top_n override (reaper.config.topn)
    # the server-time budget (reaper.daemon.cost): None = [collector]'s, 0 = off for this source
    server_budget_ms_per_minute: float | None = attrs.field(default=None, validator=rules.number(0, optional=True))
    max_interval_factor: int | None = attrs.field(default=None, validator=rules.number(1, 1024, optional=True))
    # skip the metrics marked heavy while the server has more active backends than this
    pause_when_active_backends_over: int | None = attrs.field(default=None, validator=rules.number(0, optional=True))

    @property
    def redacted_dsn(self) -> str:
        return redact_dsn(self.dsn)

    def connection_settings(self) -> tuple[Any, ...]:
        """What, when changed, needs a new connection (as opposed to an in-place update)."""
        return tuple(getattr(self, name) for name in CONNECTION_FIELDS)



@attrs.frozen
class CollectorConfig:
    queue_capacity: int = attrs.field(default=10_000, validator=rules.number(1, 10_000_000))
    shutdown_grace_seconds: float = attrs.field(default=10.0, validator=rules.seconds(above=False))
    max_backoff_seconds: float = attrs.field(default=60.0, validator=rules.seconds(1.0, above=False))
    # status file and spill queues; default: see default_state_dir() (load_config fills it in)
    state_dir: str | None = attrs.field(default=None, validator=rules.optional_path)
    # per sink: the on-disk queue a slow or dead sink fills
    spill_max_bytes: int = attrs.field(default=1024**3, validator=rules.number(0, rules.MAX_BYTES))
    # while this file exists, no source queries its server
    pause_file: str | None = attrs.field(default=None, validator=rules.optional_path)
    # a metric returning more rows fails with an error, its rows not kept (a runaway query must not swell the
    # process: reaper.db.rows.RowLimit); the shipped metrics return at most 100000
    max_rows_per_metric: int = attrs.field(default=100_000, validator=rules.number(1, 100_000_000))
    # sources whose database is smaller than this are not collected
    min_db_size_mb: int = attrs.field(default=0, validator=rules.number(0, 2**40))
    # instance-level metrics shared between sources; 0 disables
    instance_cache_max_seconds: float = attrs.field(default=30.0, validator=rules.seconds(above=False))
    # opt-in: CREATE EXTENSION these on primaries where missing
    create_extensions: tuple[str, ...] = attrs.field(default=(), validator=rules.names(what="an extension name"))
    # health endpoints (/liveness, /readiness, /status): host:port; None = none (reaper.daemon.health)
    http_listen: str | None = attrs.field(default=None, validator=attrs.validators.optional(rules.listen))
    # per source: the server time reaper's own statements may use per minute; over it, the most expensive
    # metrics are stretched (reaper.daemon.cost). None: no budget. Overridable per source.
    server_budget_ms_per_minute: float | None = attrs.field(default=None, validator=rules.number(0, above=True,
                                                                                               optional=True))
    # a stretched interval is at most this many times the configured one
    max_interval_factor: int = attrs.field(default=8, validator=rules.number(1, 1024))
    # the sliding window the cost figures (status, reaper_cost, the budget) are measured over
    cost_window_seconds: float = attrs.field(default=60.0, validator=rules.seconds(5.0, above=False, high=3600.0))


def _home(env: Mapping[str, str]) -> Path:
    """The user's home directory for the default state dir; a ConfigError when there is none (a container's user
    with no passwd entry and no HOME, a cron job's bare environment)."""
    home, why = env.get("HOME") or "", f"HOME is unset and uid {os.geteuid()} has no passwd entry"
    if not home:
        import pwd

        with contextlib.suppress(KeyError):
            home, why = pwd.getpwuid(os.geteuid()).pw_dir, f"HOME is unset and uid {os.geteuid()}'s passwd entry " \
                "names no absolute home"
    elif not os.path.isabs(home):
        why = f"HOME ({home!r}) is not an absolute path"
    if not home or not os.path.isabs(home):
        raise ConfigError([f"collector.state_dir is not set and there is no home directory to keep reaper's state "
                           f"under ({why}): set [collector] state_dir, or XDG_STATE_HOME or STATE_DIRECTORY in the "
                           f"environment"])
    return Path(home)


def default_state_dir(config_path: str | Path | None, environ: Mapping[str, str] | None = None) -> str:
    """Where a daemon run with this config file keeps its state, when `[collector] state_dir` is not set.

    $STATE_DIRECTORY (systemd's StateDirectory=) wins; otherwise one directory per config file, so two
    reapers on one host never share a status file or spill queues:
    `/var/lib/reaper/<config stem>-<8 hex of sha256(absolute config path)>` for root, else the same name
    under `$XDG_STATE_HOME/reaper` (default ~/.local/state/reaper). With no config file (None), the
    base directory itself (only for a command given neither a config nor a state dir)."""
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    base = Path("/var/lib/reaper") if os.geteuid() == 0 else (
        Path(env.get("XDG_STATE_HOME") or _home(env) / ".local" / "state") / "reaper")
    if config_path is None:
        return str(base)
    absolute = Path(os.path.abspath(config_path))
    digest = hashlib.sha256(str(absolute).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return str(base / f"{absolute.stem or 'config'}-{digest}")


@attrs.frozen
class SourcesFromConfig:
    """A `[[sources_from]]` table: sources read from a pgwatch config database (its `pgwatch.source`
    table), read-only, every `refresh_seconds` and on reload (reaper.daemon.sources_from)."""

    dsn: str = attrs.field(converter=rules.uri_dsn, validator=rules.dsn_ports)
    refresh_seconds: float = attrs.field(default=120.0, validator=rules.seconds(1.0, above=False))
    password_file: str | None = attrs.field(default=None, validator=rules.optional_path)
    connect_timeout_seconds: float = attrs.field(default=5.0, validator=rules.seconds())
    query_timeout_seconds: float = attrs.field(default=30.0, validator=rules.seconds(0.001, above=False))

    @property
    def label(self) -> str:
        return f"config database {redact_dsn(self.dsn)}"


def _check_member(_instance: Any, _attribute: Any, value: str) -> None:
    problem = rules.name_problem(value, "a member name") if value else None
    if problem is None and len(value.encode()) > 50:  # it goes into application_name (63 bytes at most)
        problem = "a member name of at most 50 bytes (it is part of every connection's application_name)"
    if problem:
        raise rules.FieldValueError(problem)


@attrs.frozen
class FleetConfig:
    """`[fleet]`: several reaper processes share the sources through PostgreSQL advisory locks held in
    one coordination database (reaper.daemon.fleet). Absent: this process collects every source."""

    dsn: str = attrs.field(converter=rules.uri_dsn, validator=rules.dsn_ports)
    member: str = attrs.field(default="", validator=_check_member)  # "": hostname:pid
    refresh_seconds: float = attrs.field(default=10.0, validator=rules.seconds(0.5, above=False))
    password_file: str | None = attrs.field(default=None, validator=rules.optional_path)
    connect_timeout_seconds: float = attrs.field(default=5.0, validator=rules.seconds())

    @property
    def member_name(self) -> str:
        return self.member or f"{socket.gethostname()}:{os.getpid()}"


@attrs.frozen
class Config:
    sources: tuple[SourceConfig, ...] = ()
    sources_from: tuple[SourcesFromConfig, ...] = ()
    fleet: FleetConfig | None = None
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

    def structure_strings(value: Any, _type: Any) -> tuple[str, ...]:
        # (cattrs would take a string for a sequence and split it into its characters)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise TypeError(f'expected a list of strings (["a", "b"]), got {value!r}')

    def structure_literal(value: Any, type_: Any) -> Any:
        choices = typing.get_args(type_)
        if isinstance(value, bool) or value not in choices:  # bool: True == 1 must not pass for a Literal[1]
            raise ValueError(f"{value!r} is not one of: {', '.join(str(c) for c in choices)}")
        return value

    def structure_model(value: Any, cls: type[Any]) -> Any:
        return _structure_model(conv, value, cls)

    conv.register_structure_hook(NameList, structure_names)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], structure_strings)
    conv.register_structure_hook_func(lambda t: typing.get_origin(t) is Literal, structure_literal)
    conv.register_structure_hook_func(lambda t: t in CONFIG_MODELS, structure_model)
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


CONFIG_MODELS: frozenset[type[Any]] = frozenset({
    MetricDef, PresetDef, SourceConfig, SpecialsConfig, JsonFileSinkConfig, PostgresSinkConfig, PrometheusSinkConfig,
    CollectorConfig, SourcesFromConfig, FleetConfig, TopN})


class StructureProblems(ValueError):
    """Every problem found in one table, as `key.path: message` lines relative to the table."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("; ".join(lines))


def unknown_key(key: str, valid: list[str]) -> str:
    """`key: unknown key (did you mean X?) (valid keys: ...)`, the line for a key a table does not have."""
    import difflib  # only for a config with a mistake: a daemon that starts never needs it

    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key}: unknown key{hint} (valid keys: {', '.join(sorted(valid))})"


def _structure_model(conv: cattrs.Converter, raw: Any, cls: type[Any]) -> Any:
    """Structure one config table, collecting every problem: unknown keys (with a suggestion), missing
    keys, wrong types, and each field's rule (its attrs validator, run here so all are reported at once)."""
    if not isinstance(raw, Mapping):
        raise TypeError(f"expected a table, got {raw!r}")
    attrs.resolve_types(cls)
    fields = {f.alias or f.name: f for f in attrs.fields(cls)}
    lines = [unknown_key(str(key), list(fields)) for key in raw if key not in fields]
    kwargs: dict[str, Any] = {}
    for key, field in fields.items():
        if key not in raw:
            if field.default is attrs.NOTHING:
                lines.append(f"{key}: required")
            continue
        try:
            value = conv.structure(raw[key], field.type)
        except Exception as e:  # cattrs' groups, our TypeErrors and ValueErrors
            lines.extend(_format_cattrs_errors(e, key))
            continue
        if field.validator is not None or field.converter is not None:
            try:
                if callable(field.converter):  # idempotent ones only (cls() below runs it again)
                    value = field.converter(value)
                if field.validator is not None:
                    field.validator(None, field, value)
            except rules.FieldValueError as e:
                where = key if e.key is None else (f"{key}{e.key}" if e.key.startswith("[") else f"{key}.{e.key}")
                lines.append(f"{where}: {e.message}")
                continue
            except ValueError as e:
                lines.append(f"{key}: {e}")
                continue
        kwargs[key] = value
    if lines:
        raise StructureProblems(lines)
    return cls(**kwargs)


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
    elif isinstance(exc, StructureProblems):
        for line in exc.lines:
            if not path:
                lines.append(line)
            else:
                lines.append(f"{path}{line}" if line.startswith("[") else f"{path}.{line}")
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
        lines.append(f"{path}: {message}" if path else message)
    return lines


