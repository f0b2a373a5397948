"""What a source emits: its measurements (tagged like pgwatch's), instance_up, restart markers, and
the rows it shares with (or takes from) the other sources of its instance through the InstanceCache.

A cached instance-level result is delivered to the other databases of the instance, never back to
the source that fetched it, and never twice to one source (issue 12: duplicate samples).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, SourceConfig
from reaper.config.topn import ActiveTopN, resolve
from reaper.daemon.cache import InstanceCache
from reaper.daemon.sourcestate import FleetControls, SourceState
from reaper.daemon.topn import TopNState
from reaper.db.link import SourceLink
from reaper.measurement import Measurement
from reaper.sinks.rejected import set_aside


class Delivering(Protocol):
    """What delivery reads of its source (reaper.daemon.source.SourceReaper); a Protocol, so that this
    module does not import the one that uses it."""

    config: SourceConfig
    catalog: Catalog
    state: SourceState
    controls: FleetControls
    conn: SourceLink | None
    instance_cache: InstanceCache | None

    def emit(self, measurement: Measurement, /) -> None: ...

log = logging.getLogger("reaper.daemon.source")
# a row's epoch_ns this far from reaper's clock is not the time it was collected (a server's clock is not a day off)
EPOCH_SLACK_NS = 86_400 * 10**9


class Output:
    """One source's delivery to the fan-out (`emit`), with the per-source counters in its state."""

    def __init__(self, reaper: Delivering) -> None:
        self.reaper = reaper
        self._cache_seen: dict[str, int] = {}  # metric -> serial of the cache entry last delivered
        self._down_sent_tick: int | None = None  # the tick in which instance_up = 0 was sent on going down
        self._last_uptime: float | None = None
        self._topn: dict[str, TopNState] = {}  # metric -> its top-N folding state (reaper.daemon.topn)
        # metric -> (definition, config, catalog, standby, its resolved top-N setting), compared by identity
        self._topn_resolved: dict[str, tuple[MetricDef, SourceConfig, Catalog, bool, ActiveTopN | None]] = {}
        self._epoch_said: set[str] = set()  # metrics whose epoch_ns was no time near now (said once)
        self._bugs: set[str] = set()  # metrics whose rows met a bug in reaper (its traceback said once)

    def deliver(self, metric: MetricDef, rows: list[dict[str, Any]], wall_ns: int, *, table: str | None = None,
                shared: bool = False, go_ready: bool = False) -> None:
        """Hand rows to the sinks (`_deliver`); a bug on their way (rows it cannot handle) fails this metric's
        delivery alone, its rows set aside: the source goes on (`bug`)."""
        try:
            self._deliver(metric, rows, wall_ns, table=table, shared=shared, go_ready=go_ready)
        except Exception as e:
            self.bug(metric, e, wall_ns, rows)

    def bug(self, metric: MetricDef, error: Exception, wall_ns: int, rows: list[dict[str, Any]] | None = None) -> None:
        """A bug in reaper on one metric's rows (or in a special metric's collector): said once per metric with its
        traceback, counted as a metric error, the rows of its first occurrence set aside in
        `<state_dir>/rejected/sources/` (enough to see it again; a 1 s metric's every run would fill the disk);
        never a crash of the source, which past the supervisor's limit would stop it (and all its metrics)."""
        r = self.reaper
        r.state.metric_errors += 1
        first = metric.name not in self._bugs
        self._bugs.add(metric.name)
        where = None
        if rows and first:
            m = Measurement(source=r.config.name, metric=metric.name, table=metric.table, epoch_ns=wall_ns,
                            rows=tuple(rows), tags=r.config.tags)
            where = set_aside(r.controls.rejected_dir, f"source {r.config.name}", [m], error)
        log.log(logging.ERROR if first else logging.DEBUG, "source %s: metric %s: a bug in reaper (%s: %s); %s, the "
                "other metrics are unaffected%s", r.config.name, metric.name, type(error).__name__, error,
                f"its rows set aside in {where} (later runs' rows are counted in its metric errors, not kept)"
                if where else "nothing delivered this run", "" if first else " (again)",
                exc_info=error if first else None)

    def _deliver(self, metric: MetricDef, rows: list[dict[str, Any]], wall_ns: int, *, table: str | None = None,
                 shared: bool = False, go_ready: bool = False) -> None:
        """Hand rows to the sinks, each row tagged like pgwatch's with real_dbname and sys_id.

        `shared` rows (from the instance cache) are copied first: they are another source's too.
        `go_ready`: the rows' numbers are already in Go's JSON form (reaper.db.go_rows; top-N folding
        makes new rows, which are not).
        """
        if not rows:
            return
        r = self.reaper
        fold = self._topn_state(metric)
        if fold is not None:
            rows = fold.fold(rows)  # members are the rows given (or copies), `other` a new row
            go_ready = False
        conn = r.conn
        if conn is not None:
            server = conn.server
            extra = {"real_dbname": server.database, "sys_id": server.system_identifier}
            if shared:
                rows = [{**row, **extra} for row in rows]
            else:
                for row in rows:
                    row.update(extra)
        first = rows[0].get("epoch_ns")
        if type(first) is int and not -EPOCH_SLACK_NS < first - wall_ns < EPOCH_SLACK_NS:
            rows = self._collected_at(metric.name, rows, wall_ns, first)
        m = Measurement.from_rows(source=r.config.name, metric=metric.name, table=table or metric.table,
                                  rows=rows, tags=r.config.tags, wall_ns=wall_ns, go_ready=go_ready)
        st = r.state
        st.measurements += 1
        st.rows += len(rows)
        st.metric_rows[metric.name] = len(rows)
        st.metric_measurements[metric.name] = st.metric_measurements.get(metric.name, 0) + 1
        r.emit(m)

    def _collected_at(self, metric: str, rows: list[dict[str, Any]], wall_ns: int, first: int) -> list[dict[str, Any]]:
        """Rows whose epoch_ns is no time near now (seconds or milliseconds since 1970 where nanoseconds belong,
        another column's number): stored at 1970 or in 2262, each sink's retention and time range lost them
        without a word. Their epoch_ns becomes the time they were collected; said once per metric."""
        if metric not in self._epoch_said:  # the first metric of the source at WARNING, the others (a server's
            years = (first - wall_ns) / (365.25 * 86400e9)  # clock a day off makes every metric say it) at DEBUG
            log.log(logging.DEBUG if self._epoch_said else logging.WARNING,
                    "source %s: metric %s: epoch_ns %d is %s %s reaper's clock (nanoseconds since 1970 expected: "
                    "seconds or milliseconds? or the server's clock is off); its rows get the time they were "
                    "collected instead%s", self.reaper.config.name, metric, first,
                    f"{abs(years):.3g} years" if abs(years) >= 1 else f"{abs(first - wall_ns) / 3600e9:.3g} hours",
                    "ahead of" if years > 0 else "behind",
                    "" if self._epoch_said else " (other metrics of this source found so: at debug level)")
            self._epoch_said.add(metric)
        return [{**row, "epoch_ns": wall_ns} for row in rows]

    def _topn_state(self, metric: MetricDef) -> TopNState | None:
        """The metric's top-N folding state for this source, when top_n is on (definition, the active
        preset, the source's own override); a changed setting starts a new state."""
        r = self.reaper
        config = r.config
        standby = bool(r.state.in_recovery) and bool(config.standby_preset or config.standby_metrics)
        # resolved once per (definition, config, catalog, role): this runs for every measurement of every tick
        known = self._topn_resolved.get(metric.name)
        if (known is not None and known[0] is metric and known[1] is config and known[2] is r.catalog
                and known[3] == standby):
            settings = known[4]
        else:
            settings = self._resolve_topn(metric, standby)
            self._topn_resolved[metric.name] = (metric, config, r.catalog, standby, settings)
        if settings is None:
            if self._topn:
                self._topn.pop(metric.name, None)
            return None
        state = self._topn.get(metric.name)
        if state is None or state.settings != settings:
            state = self._topn[metric.name] = TopNState(settings, metric.is_gauge)
        state.is_gauge = metric.is_gauge  # a reload may have changed the definition's gauges
        return state

    def _resolve_topn(self, metric: MetricDef, standby: bool) -> ActiveTopN | None:
        config = self.reaper.config
        preset_name = config.standby_preset if standby else config.preset
        preset = self.reaper.catalog.presets.get(preset_name) if preset_name else None
        try:
            return resolve(metric.top_n, preset.top_n.get(metric.name) if preset else None,
                           config.top_n.get(metric.name))
        except ValueError:  # refused by `reaper check` / load_config: only a config built in code gets here
            return None

    # -- instance_up -----------------------------------------------------------------------------

    def instance_up(self, metrics: Mapping[str, MetricDef], up: int, wall_ns: int) -> None:
        metric = metrics.get("instance_up")
        if metric is None or (up == 0 and self._down_sent_tick == self.reaper.state.ticks):
            return  # not due, or already sent in this tick when the source went down
        self._send_up(metric, up, wall_ns)

    def went_down(self, active: Mapping[str, int], wall_ns: int) -> None:
        """The source just went down: instance_up = 0 now, whether or not it is due in this tick."""
        metric = self.reaper.catalog.metrics.get("instance_up")
        if metric is None or "instance_up" not in active:
            return
        self._down_sent_tick = self.reaper.state.ticks
        self._send_up(metric, 0, wall_ns)

    def _send_up(self, metric: MetricDef, up: int, wall_ns: int) -> None:
        self.deliver(metric, [{"epoch_ns": wall_ns, "instance_up": up}], wall_ns)
        self.reaper.state.last_fetch["instance_up"] = trio.current_time()

    # -- restarts ----------------------------------------------------------------------------------

    def detect_restart(self, row: Mapping[str, Any], wall_ns: int) -> None:
        """A postmaster uptime that went backwards means the server restarted (or failed over)."""
        uptime = row.get("postmaster_uptime_s")
        if not isinstance(uptime, int | float):
            return
        last, self._last_uptime = self._last_uptime, float(uptime)
        if last is not None and uptime < last:
            log.warning("source %s: server restart (or failover) detected: uptime %ss, was %ss",
                        self.reaper.state.name, uptime, last)
            marker = MetricDef(name="object_changes", description="restarts and failovers")
            self.deliver(marker, [{"epoch_ns": wall_ns, "details": "Detected server restart (or failover)"}],
                         wall_ns)

    # -- the instance cache --------------------------------------------------------------------------

    def _cache_key(self, conn: SourceLink | None, metric: MetricDef) -> tuple[str, str, str] | None:
        if conn is None or self.reaper.instance_cache is None or not metric.instance_level:
            return None
        server = conn.server
        if not server.system_identifier:
            return None
        return (server.system_identifier, server.address, metric.name)

    def deliver_cached(self, conn: SourceLink, metric: MetricDef, now: float, interval: float, wall_ns: int) -> bool:
        """Deliver rows another source of the same instance fetched less than one interval ago (and
        within the cache's max age), unless this source delivered that entry already. True if done."""
        key = self._cache_key(conn, metric)
        cache = self.reaper.instance_cache
        if key is None or cache is None:
            return False
        entry = cache.get(key, now, max_age=interval, source=self.reaper.config.name,
                          seen=self._cache_seen.get(metric.name))
        if entry is None:
            return False
        self._cache_seen[metric.name] = entry.serial
        self.deliver(metric, entry.rows, wall_ns, shared=True, go_ready=entry.go_ready)
        self.reaper.state.last_fetch[metric.name] = now
        return True

    def remember(self, metric: MetricDef, now: float, rows: list[dict[str, Any]], *, go_ready: bool = False) -> None:
        key = self._cache_key(self.reaper.conn, metric)
        cache = self.reaper.instance_cache
        if key is not None and cache is not None:
            entry = cache.put(key, now, rows, source=self.reaper.config.name, go_ready=go_ready)
            self._cache_seen[metric.name] = entry.serial
