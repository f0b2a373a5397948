"""reaper's own health as Prometheus families, from the daemon's status (reaper.daemon.status): sources, sinks,
reloads, tasks, fleet membership, and the ticks' lateness histogram. The Prometheus sink adds its own scrape
figures (reaper.sinks.prometheus)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from reaper.daemon.status import DaemonStatus, LatenessBuckets, SourceStatus

Rows = Iterable[tuple[list[str], float]]
Add = Callable[[str, str, list[str], Rows], None]


def family_adders(out: list[Metric]) -> tuple[Add, Add]:
    """gauge(name, doc, labels, rows) and counter(...): each appends one family to `out`."""

    def gauge(name: str, doc: str, labels: list[str], rows: Rows) -> None:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for values, value in rows:
            family.add_metric(values, value)
        out.append(family)

    def counter(name: str, doc: str, labels: list[str], rows: Rows) -> None:
        family = CounterMetricFamily(name, doc, labels=labels)  # exposed as <name>_total
        for values, value in rows:
            family.add_metric(values, value)
        out.append(family)

    return gauge, counter


def lateness_family(buckets: LatenessBuckets) -> Metric:
    """reaper_tick_lateness_seconds: how late every source's ticks started, since the daemon started."""
    family = HistogramMetricFamily("reaper_tick_lateness_seconds", "How late the sources' ticks started behind their "
                                   "schedule (all sources, since the daemon started).", labels=[])
    pairs = [(floatToGoString(le), count) for le, count in zip(buckets.le, buckets.counts, strict=False)]
    family.add_metric([], [*pairs, ("+Inf", buckets.total)], buckets.sum)
    return family


def status_families(status: DaemonStatus, out: list[Metric]) -> None:
    """Append the families read from the daemon's status to `out`."""
    gauge, counter = family_adders(out)
    src, snk = status.sources, status.sinks
    gauge("reaper_source_up", "1 when the source's server answers, else 0.", ["source"],
          (([s.name], 1.0 if s.status == "up" else 0.0) for s in src))
    counter("reaper_source_ticks", "Ticks the source has run.", ["source"],
            (([s.name], s.ticks) for s in src))
    counter("reaper_source_measurements", "Measurements the source has delivered.", ["source"],
            (([s.name], s.measurements) for s in src))
    counter("reaper_source_rows", "Rows the source has delivered.", ["source"],
            (([s.name], s.rows) for s in src))
    counter("reaper_source_metric_errors", "Metric queries of the source that failed.", ["source"],
            (([s.name], s.metric_errors) for s in src))
    gauge("reaper_source_degraded_metrics", "Metrics of the source running alone after a failure.",
          ["source"], (([s.name], len(s.degraded)) for s in src))
    gauge("reaper_source_statements_last_tick", "Statements sent to the server in the source's last tick.",
          ["source"], (([s.name], s.statements_last_tick) for s in src))
    gauge("reaper_source_tick_lateness_p50_seconds", "Median delay of the source's ticks behind schedule.",
          ["source"], (([s.name], s.lateness_p50) for s in src))
    gauge("reaper_source_tick_lateness_p99_seconds", "99th percentile delay of the source's ticks behind "
          "schedule.", ["source"], (([s.name], s.lateness_p99) for s in src))
    if status.tick_lateness is not None:
        out.append(lateness_family(status.tick_lateness))
    for kind, name, doc, labels, rows in cost_families(src):  # reaper.daemon.cost's figures
        (counter if kind == "counter" else gauge)(name, doc, labels, rows)
    gauge("reaper_sink_queue_depth", "Measurements waiting in the sink's memory queue.", ["sink"],
          (([s.label], s.queued) for s in snk))
    counter("reaper_sink_sent", "Measurements handed to the sink's queue.", ["sink"],
            (([s.label], s.sent) for s in snk))
    counter("reaper_sink_spilled", "Measurements written to the sink's on-disk spill queue.", ["sink"],
            (([s.label], s.spilled) for s in snk))
    counter("reaper_sink_dropped", "Measurements lost for the sink (queue and spill full).", ["sink"],
            (([s.label], s.dropped) for s in snk))
    gauge("reaper_sink_spill_bytes", "Bytes in the sink's on-disk spill queue.", ["sink"],
          (([s.label], s.spill_bytes) for s in snk))
    counter("reaper_reloads", "Configuration reloads applied.", [], [([], status.reloads)])
    counter("reaper_reload_failures", "Configuration reloads rejected (invalid file).", [],
            [([], status.reload_failures)])
    gauge("reaper_tasks", "Live trio tasks in the daemon (reaper's own, without the asyncio loop's "
          "socket watchers).", [], [([], status.tasks - status.io_tasks)])
    gauge("reaper_start_time_seconds", "When the daemon started (unix time).", [], [([], status.started_wall)])
    gauge("reaper_build_info", "reaper's version (value 1).", ["version"], [([status.version], 1.0)])
    if status.fleet is not None:
        gauge("reaper_fleet_members", "Live members of the fleet, as this member saw at its last refresh.",
              [], [([], len(status.fleet.members))])
        gauge("reaper_fleet_sources_owned", "Sources each live member owns (holds the lock of).", ["member"],
              [([m.name], len(m.sources)) for m in status.fleet.members]
              or [([status.fleet.member], status.fleet.owned)])


Family = tuple[str, str, str, list[str], list[tuple[list[str], float]]]


def cost_families(sources: Iterable[SourceStatus]) -> list[Family]:
    """The Prometheus families of the sources' cost (kind, name, help, labels, samples), for the
    prometheus sink's reaper_* self-metrics; counters are exposed as <name>_total."""
    per_metric = [(s.name, m) for s in sources if s.cost is not None for m in s.cost.metrics]
    with_cost = [(s.name, s.cost) for s in sources if s.cost is not None]
    return [
        ("counter", "reaper_source_server_seconds", "Server time reaper's statements of the metric have taken.",
         ["source", "metric"], [([n, m.metric], m.server_seconds_total) for n, m in per_metric]),
        ("counter", "reaper_source_metric_rows", "Rows the metric's statements have returned.",
         ["source", "metric"], [([n, m.metric], float(m.rows_total)) for n, m in per_metric]),
        ("counter", "reaper_source_metric_bytes", "Estimated bytes of the rows the metric's statements returned.",
         ["source", "metric"], [([n, m.metric], float(m.bytes_total)) for n, m in per_metric]),
        ("gauge", "reaper_source_server_seconds_per_minute", "Server seconds per minute reaper's statements cost "
         "the source now (over the cost window).", ["source"],
         [([n], c.server_ms_per_minute / 1000.0) for n, c in with_cost]),
        ("gauge", "reaper_source_effective_interval_seconds", "The metric's interval after the server budget's "
         "stretching.", ["source", "metric"], [([n, m.metric], float(m.effective_interval)) for n, m in per_metric]),
        ("gauge", "reaper_source_server_budget_seconds_per_minute", "The source's server budget (absent: none).",
         ["source"], [([n], c.budget_ms_per_minute / 1000.0) for n, c in with_cost if c.budget_ms_per_minute]),
    ]
