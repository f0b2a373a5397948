"""The [[sinks]] tables: one frozen attrs model per sink type (jsonfile, postgres, prometheus). No I/O."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from reaper.config import rules
from reaper.config.redact import redact_dsn


def _check_file_mode(_instance: Any, _attribute: Any, value: int) -> None:
    """A data file's mode: the owner reads and writes it; no execute bits, nothing beyond 0o666."""
    if isinstance(value, bool) or not isinstance(value, int) or value & ~0o666 or value & 0o600 != 0o600:
        raise rules.FieldValueError("expected a file mode in TOML octal, 0o600 (the default) .. 0o666: the owner "
                                    "reads and writes, no execute bits")


@attrs.frozen
class JsonFileSinkConfig:
    path: str = attrs.field(validator=rules.name(what="a path (\"-\" for stdout)"))
    type: Literal["jsonfile"] = "jsonfile"
    name: str = ""
    # rotate when the file would grow past this size
    max_bytes: int | None = attrs.field(default=None, validator=rules.number(1, rules.MAX_BYTES, optional=True))
    # rotated files kept: path.1 (newest) .. path.N
    backups: int = attrs.field(default=5, validator=rules.number(0, 1000))
    # permissions of the files it creates (TOML octal: 0o640 lets a log shipper's group read them)
    file_mode: int = attrs.field(default=0o600, validator=_check_file_mode)

    @property
    def label(self) -> str:
        return self.name or f"jsonfile:{self.path}"


def _check_partition_interval(_instance: Any, _attribute: Any, value: str) -> None:
    """The width of the storage's time partitions: "1 hour" .. "1 week" (ValueError says what is wrong)."""
    from reaper.db.storage_schema import parse_partition_interval

    try:
        parse_partition_interval(value)
    except ValueError as e:
        raise rules.FieldValueError(str(e).removeprefix("partition_interval ")) from None


@attrs.frozen
class PostgresSinkConfig:
    """pgwatch-compatible storage: one table per metric, time partitions, the admin schema."""

    dsn: str = attrs.field(converter=rules.uri_dsn, validator=rules.dsn_ports)
    type: Literal["postgres"] = "postgres"
    name: str = ""
    password_file: str | None = attrs.field(default=None, validator=rules.optional_path)
    # flush at least this often
    batching_delay_seconds: float = attrs.field(default=0.95, validator=rules.seconds(0.01, above=False))
    # ... or as soon as this many measurements are waiting
    batch_size: int = attrs.field(default=256, validator=rules.number(1, 1_000_000))
    # width of the time partitions: "1 hour" .. "1 week"
    partition_interval: str = attrs.field(default="1 day", validator=_check_partition_interval)
    # partitions older than this are dropped; 0 keeps everything
    retention_days: int = attrs.field(default=14, validator=rules.number(0, 100 * 366))
    # how often retention and upkeep run
    maintenance_interval_seconds: float = attrs.field(  # 0: never
        default=43200.0, validator=rules.seconds(0.0, above=False))
    connect_timeout_seconds: float = attrs.field(default=10.0, validator=rules.seconds())
    write_timeout_seconds: float = attrs.field(default=60.0, validator=rules.seconds(0.001, above=False))

    @property
    def label(self) -> str:
        return self.name or f"postgres:{redact_dsn(self.dsn)}"


@attrs.frozen
class PrometheusSinkConfig:
    """An HTTP endpoint for Prometheus to scrape: the latest sample of every series."""

    listen: str = attrs.field(default="127.0.0.1:9187", validator=rules.listen)
    type: Literal["prometheus"] = "prometheus"
    name: str = ""
    namespace: str = attrs.field(default="pgwatch", validator=rules.prometheus_namespace)
    timestamps: bool = False  # attach each sample's own time (pgwatch does; it makes long intervals go stale)
    # a series of a metric whose interval is unknown is dropped after this long without a refresh
    # (others after two of their metric's intervals)
    stale_after_seconds: float = attrs.field(default=900.0, validator=rules.seconds())

    @property
    def label(self) -> str:
        return self.name or f"prometheus:{self.listen}"


SinkConfig = JsonFileSinkConfig | PostgresSinkConfig | PrometheusSinkConfig
SINK_TYPES: dict[str, type[Any]] = {
    "jsonfile": JsonFileSinkConfig,
    "postgres": PostgresSinkConfig,
    "prometheus": PrometheusSinkConfig,
}
