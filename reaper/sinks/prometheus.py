"""prometheus sink: an HTTP endpoint that Prometheus scrapes, served inside the trio tree.

Pull model, as pgwatch: `write` keeps only the latest measurement per (source, metric, table), so
memory is bounded by the configuration, not by time. A scrape turns those into pgwatch's series:

    <namespace>_<metric>_<column>{dbname="<source>", <custom tags>, <tag_ columns without the prefix>}
    <namespace>_instance_up{dbname="<source>"}

(<metric> is the storage name.) Numeric and boolean columns only (bool -> 1/0, Decimal -> float, NaN
stays NaN); text columns, nulls and `epoch_ns` are skipped. Gauge columns (`gauges` of the metric
definition) are typed `gauge`; cumulative counters are typed `untyped` under their pgwatch name: a
`counter` type needs the `_total` suffix (prometheus-client adds it, `promtool check metrics` demands
it), which would rename every series pgwatch's dashboards query. `rate()` works the same on both.

No sample timestamps unless `timestamps = true`: Prometheus stamps each sample with the scrape time,
so long-interval metrics stay visible between collections (pgwatch #749/#1003). A series not
refreshed for two of its metric's intervals disappears (`stale_after_seconds` where the interval is
unknown), so a source that goes down shows only `instance_up 0` after two intervals, as do
the series of a source or metric no longer configured. `change_events` and the pooler metrics are
not exported (as in pgwatch). Rows whose labels repeat within a family are dropped, warned once.

The server speaks HTTP with hypercorn's protocol under reaper's own accept loop
(reaper.sinks.http_serve: at most MAX_CONNECTIONS open connections, EMFILE on accept is one line a
minute). `open()` binds `listen` (an error is a ConfigError there) and
starts `serve()` in the nursery the sink's runner gives it (reaper.sinks.runner: the sink's own
nursery, inside its cancel scope), so the server lives inside the trio tree; `aclose()` triggers hypercorn's graceful
shutdown and waits for it (bounded by GRACEFUL_TIMEOUT_SECONDS). Every path answers, always in the
classic text format 0.0.4 (as pgwatch's promhttp), gzipped when asked.

A scrape purges and snapshots in the trio thread, then renders in a worker thread, so a large
exposition does not stall the sources' ticks. pgwatch's series are written by `Family`: one label
string per row, shared by all its columns (270,000 samples of table_stats render in 0.4 s; built as
prometheus-client metric families and encoded by it, 7.5 to 11 s). reaper's own `reaper_*` families
are few and go through prometheus-client.
"""

from __future__ import annotations

import decimal
import gzip
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric

from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, PrometheusSinkConfig, SourceConfig
from reaper.daemon.status import DaemonStatus
from reaper.errors import ConfigError
from reaper.measurement import Measurement
from reaper.sinks.http_serve import answers_get, serve_bounded
from reaper.sinks.selfmetrics import family_adders, status_families

log = logging.getLogger("reaper.sinks.prometheus")
http_log = logging.getLogger("reaper.sinks.prometheus.http")  # hypercorn's errors
http_log.setLevel(logging.WARNING)  # not its "Running on ... (CTRL + C to quit)": open() logs where it listens

NOT_EXPORTED = frozenset({"change_events", "pgbouncer_stats", "pgbouncer_clients", "pgpool_processes",
                          "pgpool_stats"})
GRACEFUL_TIMEOUT_SECONDS = 2.0
# A flood of clients must not take the sources' file handles (reaper.sinks.http_serve): scrapers are few.
MAX_CONNECTIONS = 32  # open at once; more wait in the listen backlog
LISTEN_BACKLOG = 64
KEEP_ALIVE_SECONDS = 5  # an idle connection is closed after this
READ_TIMEOUT_SECONDS = 10  # a client that stops sending mid-request is dropped after this
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")

ASGIScope = Mapping[str, Any]
ASGIReceive = Callable[[], Any]
ASGISend = Callable[[dict[str, Any]], Any]


def metric_name(name: str) -> str:
    """A valid Prometheus metric name: anything outside [a-zA-Z0-9_] becomes '_'."""
    name = _INVALID_NAME_CHARS.sub("_", name)
    return "_" + name if not name or name[0].isdigit() else name


def label_name(name: str) -> str:
    """A valid label name that is not reserved ('__' prefix)."""
    name = metric_name(name)
    return "_" + name.lstrip("_") if name.startswith("__") else name


def bind_listen(listen: str, what: str = "") -> socket.socket:
    """A TCP socket bound to "host:port" ("[::1]:port" for IPv6, ":port" for every IPv4 address). An error is
    one ConfigError line, after `what: ` (the key it came from) when given."""
    prefix = f"{what}: " if what else ""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError([f"{prefix}listen {listen!r}: expected host:port"])
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise ConfigError([f"{prefix}cannot listen on {listen!r}: {e.strerror or e}"]) from None
    return sock


def sample_value(value: Any) -> str | None:
    """A column's sample value as exposition text, or None when it is not numeric (text, null, times)."""
    kind = type(value)
    if kind is bool:
        return "1" if value else "0"
    if kind is int:
        return str(value)
    if kind is float:
        return _float_text(value)
    if isinstance(value, decimal.Decimal):
        try:
            return _float_text(float(value))
        except ValueError:  # signalling NaN
            return "NaN"
    if isinstance(value, int):  # subclasses (IntEnum and the like); bool was handled first
        return str(int(value))
    return None


def _float_text(value: float) -> str:
    if math.isfinite(value):
        return repr(value)
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@attrs.frozen
class Entry:
    """The latest measurement of one (source, metric, table), and when it arrived (sink clock)."""

    measurement: Measurement
    received: float


@attrs.frozen
class Snapshot:
    """What one scrape renders; taken in the trio thread, rendered in a worker thread."""

    entries: tuple[tuple[Entry, MetricDef | None], ...]
    status: DaemonStatus | None


@attrs.define
class Family:
    """One pgwatch metric family of a scrape, as exposition lines."""

    name: str
    gauge: bool
    help: str
    lines: list[str] = attrs.field(factory=list)
    seen: set[str] = attrs.field(factory=set)  # label strings already exposed

    def text(self) -> str:
        kind = "gauge" if self.gauge else "untyped"
        doc = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return f"# HELP {self.name} {doc}\n# TYPE {self.name} {kind}\n" + "".join(self.lines)


class PrometheusSink:
    """The latest measurement per (source, metric, table), exposed over HTTP in Prometheus's text format.

    `catalog` gives the metric definitions (gauges, descriptions); `sources` the configured sources
    (series of sources and metrics no longer configured are purged); `status` the daemon's self-report.
    All three are called at scrape time, in the trio thread, so a reload is seen at the next scrape.
    """

    spillable = False  # the latest value is all it keeps: replaying old measurements would be pointless

    def __init__(self, config: PrometheusSinkConfig, *, catalog: Callable[[], Catalog] | None = None,
                 sources: Callable[[], Iterable[SourceConfig]] | None = None,
                 status: Callable[[], DaemonStatus] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.label = config.label
        self._catalog = catalog or _shipped_catalog
        self._sources = sources
        self._status = status
        self._clock = clock
        self.latest: dict[tuple[str, str, str], Entry] = {}  # a special metric may write several tables
        self.urls: list[str] = []  # where the server listens, once started
        self.scrapes = 0
        self.last_scrape_seconds = 0.0
        self.last_scrape_samples = 0
        self._warned_duplicates: set[str] = set()
        self._status_failed = False
        self._render_limiter = trio.CapacityLimiter(1)
        self._shutdown = trio.Event()
        self._stopped = trio.Event()

    def __repr__(self) -> str:
        where = ",".join(self.urls) or self.config.listen
        return f"<PrometheusSink {where} series_sets={len(self.latest)} scrapes={self.scrapes}>"

    # -- the Sink protocol ---------------------------------------------------------------------

    async def open(self, beside: trio.Nursery | None = None) -> None:
        """Bind `listen` (an error raises here) and start the HTTP server in `beside`, the sink's own nursery
        (reaper.sinks.runner gives it), so the server lives and ends inside this sink's scope."""
        sock = bind_listen(self.config.listen)  # the sink's runner names the sink in what it logs
        if beside is None:
            sock.close()
            raise TypeError("the Prometheus sink serves beside its task: open it through run_sink()")
        self.urls = await beside.start(self.serve, sock)
        log.info("sink %s: serving metrics on %s", self.label, ", ".join(self.urls))

    async def write(self, batch: list[Measurement]) -> None:
        now = self._clock()
        for m in batch:
            if m.metric in NOT_EXPORTED:
                continue
            key = (m.source, m.metric, m.table)
            old = self.latest.get(key)
            if old is None or m.epoch_ns >= old.measurement.epoch_ns:
                self.latest[key] = Entry(m, now)

    async def aclose(self) -> None:
        self._shutdown.set()
        if self.urls:
            await self._stopped.wait()

    # -- the server ----------------------------------------------------------------------------

    async def serve(self, sock: socket.socket, *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on the bound socket until `aclose()`; reports the URLs once it listens."""
        config = HypercornConfig()
        config.accesslog = None
        config.errorlog = http_log
        config.graceful_timeout = GRACEFUL_TIMEOUT_SECONDS
        config.keep_alive_timeout = KEEP_ALIVE_SECONDS
        config.read_timeout = READ_TIMEOUT_SECONDS
        try:
            await serve_bounded(self.asgi, config, sock, max_connections=MAX_CONNECTIONS, backlog=LISTEN_BACKLOG,
                                shutdown=self._shutdown, log=log, label=self.label, task_status=task_status)
        except Exception:
            if not self.urls:  # failed to start: open() reports it
                raise
            log.exception("sink %s: the metrics endpoint failed; it stays down", self.label)
        finally:
            self._stopped.set()

    async def asgi(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        """Every path serves the metrics (as pgwatch), always in the classic text format (0.0.4)."""
        if not await answers_get(scope, receive, send):
            return
        gzipped = any(k.lower() == b"accept-encoding" and b"gzip" in v.lower() for k, v in scope["headers"])
        snapshot = self.snapshot()
        body = await trio.to_thread.run_sync(self._render_bytes, snapshot, gzipped, limiter=self._render_limiter)
        headers = [(b"content-type", CONTENT_TYPE)]
        if gzipped:
            headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    # -- scraping ------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text a scrape returns now (in the calling thread)."""
        return self._render_bytes(self.snapshot(), False)

    def snapshot(self) -> Snapshot:
        """Purge what must disappear, then capture what to render (trio thread: it reads live state)."""
        catalog = self._catalog()
        self.purge(catalog)
        status = None
        if self._status is not None:
            try:
                status = self._status()
            except Exception:
                if not self._status_failed:
                    log.exception("sink %s: the daemon's status is unavailable; reaper_* metrics skipped",
                                  self.label)
                self._status_failed = True
        entries = tuple((e, catalog.metrics.get(e.measurement.metric)) for _, e in sorted(self.latest.items()))
        return Snapshot(entries, status)

    def purge(self, catalog: Catalog) -> None:
        """Drop stale entries and those of sources or metrics no longer configured."""
        configured = self._configured(catalog)
        now = self._clock()
        for key, entry in list(self.latest.items()):
            source, metric, _ = key
            interval = 0
            if configured is not None:
                metrics = configured.get(source)
                if metrics is None or metric not in metrics:
                    del self.latest[key]
                    continue
                interval = metrics[metric]
            # two missed collections: a source that went down keeps only instance_up = 0 (refreshed every tick)
            if now - entry.received > (2.0 * interval if interval else self.config.stale_after_seconds):
                del self.latest[key]

    def _configured(self, catalog: Catalog) -> dict[str, dict[str, int]] | None:
        """Source -> metric -> interval (primary and standby sets together); None when unknown."""
        if self._sources is None:
            return None
        result: dict[str, dict[str, int]] = {}
        for source in self._sources():
            if not source.enabled:
                continue
            intervals: dict[str, int] = {}
            for standby in (False, True):
                try:
                    active = catalog.intervals(source, standby=standby)
                except KeyError:  # an unknown preset: the config check reports it
                    continue
                for name, seconds in active.items():
                    intervals[name] = max(intervals.get(name, 0), seconds)
            result[source.name] = intervals
        return result

    def _render_bytes(self, snapshot: Snapshot, gzipped: bool) -> bytes:
        started = time.perf_counter()
        series = self.measurement_families(snapshot.entries)
        body = "".join(f.text() for f in series).encode() + generate_latest(
            _Families(self.self_families(snapshot.status)))
        self.scrapes += 1
        self.last_scrape_samples = sum(len(f.lines) for f in series)
        self.last_scrape_seconds = time.perf_counter() - started
        return gzip.compress(body) if gzipped else body

    def measurement_families(self, entries: Iterable[tuple[Entry, MetricDef | None]]) -> list[Family]:
        """pgwatch's series, one Family per name, sorted; a row's label string is shared by its columns."""
        ns = self.config.namespace
        families: dict[str, Family] = {}
        duplicates: dict[str, int] = {}
        for entry, definition in entries:
            m = entry.measurement
            if not m.rows:
                continue
            prefix = metric_name(f"{ns}_{m.table}" if ns else m.table)
            tag_columns: list[tuple[str, str]] = []
            value_columns: list[tuple[str, Family]] = []
            for column in {**m.rows[0], **m.rows[-1]}:  # the last: a top-N `other` row adds rows_folded
                if column.startswith("tag_"):
                    tag_columns.append((column, label_name(column[4:])))
                elif column != "epoch_ns":
                    if m.metric == "instance_up" and column == "instance_up":
                        name, gauge = metric_name(f"{ns}_instance_up" if ns else "instance_up"), True
                    else:
                        name = f"{prefix}_{metric_name(column)}"
                        gauge = definition is None or definition.is_gauge(column)
                    family = families.get(name)
                    if family is None:
                        family = families[name] = Family(name, gauge, _help(m, column, definition, gauge))
                    value_columns.append((column, family))
            base = {label_name(k): str(v) for k, v in m.tags.items()}
            for row in m.rows:
                labels = dict(base)
                for column, label in tag_columns:
                    value = row.get(column)
                    if value is not None:
                        labels[label] = str(value)
                labels["dbname"] = m.source
                key = "{" + ",".join(f'{k}="{label_value(v)}"' for k, v in sorted(labels.items())) + "}"
                stamp = ""
                if self.config.timestamps:
                    epoch = row.get("epoch_ns")
                    stamp = f" {(epoch if isinstance(epoch, int) else m.epoch_ns) // 1_000_000}"
                for column, family in value_columns:
                    text = sample_value(row.get(column))
                    if text is None:
                        continue
                    if key in family.seen:
                        duplicates[family.name] = duplicates.get(family.name, 0) + 1
                        continue
                    family.seen.add(key)
                    family.lines.append(f"{family.name}{key} {text}{stamp}\n")
        for name, count in duplicates.items():
            if name not in self._warned_duplicates:
                self._warned_duplicates.add(name)
                log.warning("sink %s: %s: %d samples with a label set already seen were dropped (the metric's "
                            "tag_ columns do not identify its rows); warning once", self.label, name, count)
        return [families[name] for name in sorted(families) if families[name].lines]

    def self_families(self, status: DaemonStatus | None) -> list[Metric]:
        """reaper's own health: sources, sinks, reloads, tasks (reaper.sinks.selfmetrics), and this endpoint."""
        out: list[Metric] = []
        if status is not None:
            status_families(status, out)
        gauge, counter = family_adders(out)
        counter("reaper_prometheus_scrapes", "Scrapes this endpoint has answered.", ["sink"],
                [([self.label], self.scrapes)])
        gauge("reaper_prometheus_last_scrape_duration_seconds", "Time the previous scrape took to render.",
              ["sink"], [([self.label], self.last_scrape_seconds)])
        gauge("reaper_prometheus_last_scrape_samples", "Samples of pgwatch series in the previous scrape.",
              ["sink"], [([self.label], self.last_scrape_samples)])
        return out


@attrs.frozen
class _Families:
    """A prometheus-client collector over families already built."""

    metrics: list[Metric]

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def _help(m: Measurement, column: str, definition: MetricDef | None, gauge: bool) -> str:
    about = definition.description if definition is not None and definition.description else f"Metric {m.metric}."
    kind = "gauge" if gauge else "cumulative counter"
    return f"{m.table}.{column} ({kind}): {about}"


_SHIPPED: list[Catalog] = []


def _shipped_catalog() -> Catalog:
    if not _SHIPPED:
        _SHIPPED.append(Catalog.for_config())
    return _SHIPPED[0]
