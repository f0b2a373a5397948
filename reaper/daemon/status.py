"""What the running daemon reports about itself: the status file, `reaper status`, self-metrics."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
import orjson

from reaper.daemon.plan import Plan, RunningState, SinkDescription, SourceDescription
from reaper.fsutil import make_private_dir

STATUS_FILE = "status.json"
LOCK_FILE = "reaper.lock"  # held (flock) by the running daemon for its whole life (reaper.daemon.root)
# the daemon rewrites the file when what an operator acts on changed, on SIGUSR2, and at least this often
# for its counters (reaper.daemon.statuswrite); `reaper status` asks for a fresh one
STATUS_HEARTBEAT_SECONDS = 60.0
_converter = cattrs.Converter()


def _as_is(obj: Any) -> dict[str, Any]:
    """A description's fields as they are: its dicts are already JSON values, shared between the sources
    of a fleet (reaper.daemon.plan._Shared), and never changed; copying them would undo the sharing."""
    return {field.name: getattr(obj, field.name) for field in attrs.fields(type(obj))}


_converter.register_unstructure_hook(SourceDescription, _as_is)
_converter.register_unstructure_hook(SinkDescription, _as_is)


@attrs.frozen
class LaneStatus:
    """One lane of a source: fast (the tick, connection 1), slow (connection 2), local (no connection
    of its own: its few server reads go through the slow lane's and count there)."""

    name: str
    connected: bool
    statements_last_run: int  # fast: statements of the last tick (1 unless the batch failed)
    statements_total: int
    runs: int  # ticks (fast) or jobs (slow, local)
    skipped: int  # runs skipped because the same metric was still running in that lane
    error: str | None = None  # why its connection cannot be opened now (a role's connection limit...)


@attrs.frozen
class MetricCostStatus:
    """One metric's cost to its server (reaper.daemon.cost): per minute now, and in total since start."""

    metric: str
    server_ms_per_minute: float
    rows_per_minute: float
    bytes_per_minute: float
    server_seconds_total: float
    rows_total: int
    bytes_total: int
    interval: int  # configured, seconds
    effective_interval: int  # after the server budget's stretching


@attrs.frozen
class CostStatus:
    """What reaper's statements cost one source's server, and its budget (reaper.daemon.cost)."""

    server_ms_per_minute: float
    budget_ms_per_minute: float | None
    metrics: tuple[MetricCostStatus, ...]  # most expensive first
    server_view_ms_per_minute: float | None = None  # pg_stat_statements' total_exec_time of reaper's statements
    active_backends: int | None = None  # when pause_when_active_backends_over is set
    heavy_paused: bool = False


@attrs.frozen
class SourceStatus:
    name: str
    status: str  # starting | up | down | restarting
    ticks: int
    measurements: int
    rows: int
    metric_errors: int
    degraded: tuple[str, ...]
    statements_last_tick: int
    in_recovery: bool | None
    server_version: str | None
    last_error: str | None
    last_tick_wall: float | None  # unix time
    next_tick_in: float | None  # seconds
    lateness_p50: float  # seconds between a tick's scheduled and actual start
    lateness_p99: float
    lateness_max: float
    lanes: tuple[LaneStatus, ...] = ()
    cost: CostStatus | None = None
    slow: tuple[str, ...] = ()  # metrics too slow for the tick's statement: alone in the slow lane


@attrs.frozen
class SinkStatus:
    label: str
    queued: int  # in its memory channel
    sent: int  # handed to its channel
    dropped: int  # lost: the spill was full or unavailable
    spilled: int  # written to the on-disk spill queue
    spill_bytes: int  # now on disk
    error: str | None = None  # why the sink is not writing now (cannot open, write failing), else None
    rejected: int = 0  # refused for their content, set aside in <state_dir>/rejected/<sink>/


@attrs.frozen
class FleetMemberStatus:
    name: str
    pid: int  # its coordination session's server pid
    sources: tuple[str, ...]  # the sources whose locks it holds (as far as this member's config names them)
    this: bool = False  # this process


@attrs.frozen
class FleetStatus:
    """Fleet mode: this member, the live members and what each one owns (reaper.daemon.fleet)."""

    member: str
    connected: bool
    leaving: bool
    refresh_seconds: float
    owned: int
    members: tuple[FleetMemberStatus, ...] = ()
    error: str | None = None


@attrs.frozen
class ReloadRecord:
    """The last reload: applied (the plan that was carried out) or refused (`plan.errors`)."""

    number: int  # reloads + reload_failures once it was answered: `reaper reload` waits for its own
    wall: float
    config_path: str
    applied: bool
    plan: Plan


# Upper bounds (seconds) of the tick-lateness buckets: Prometheus' default buckets with finer ones below 5 ms
LATENESS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attrs.frozen
class LatenessBuckets:
    """How late the ticks of all sources started since the daemon started, in buckets: `counts[i]` ticks
    were at most `le[i]` seconds late (cumulative, as Prometheus histograms are); the last count, one more
    than `le`, is every tick; `sum` their total lateness in seconds."""

    le: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def total(self) -> int:
        return self.counts[-1] if self.counts else 0

    def since(self, earlier: LatenessBuckets | None) -> LatenessBuckets:
        """The ticks counted after `earlier` (a snapshot of the same daemon; None: all of them)."""
        if earlier is None or earlier.le != self.le:
            return self
        counts = tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True))
        return LatenessBuckets(le=self.le, counts=counts, sum=self.sum - earlier.sum)

    def quantile(self, q: float) -> float | None:
        """The bucket bound under which a share `q` of the ticks started (an upper bound of the q-quantile);
        None without ticks, inf when it is over the last bound."""
        total = self.total
        if not total:
            return None
        wanted = q * total
        for bound, count in zip(self.le, self.counts, strict=False):
            if count >= wanted:
                return bound
        return float("inf")


@attrs.frozen
class DaemonStatus:
    pid: int
    version: str
    started_wall: float
    updated_wall: float
    config_path: str
    reloads: int
    reload_failures: int
    tasks: int  # trio tasks alive (long-lived ones dominate)
    sources: tuple[SourceStatus, ...]
    sinks: tuple[SinkStatus, ...]
    io_tasks: int = 0  # of `tasks`: the asyncio loop's socket watchers (app.count_tasks), not reaper's own
    running: RunningState | None = None  # what runs, without secrets: `reaper reload --plan` compares a config to it
    last_reload: ReloadRecord | None = None
    fleet: FleetStatus | None = None  # [fleet] only
    tick_lateness: LatenessBuckets | None = None  # every source's ticks since start


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank (cheap: the status is written often)."""
    if not ordered:
        return 0.0
    return float(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))])


def unstructure(status: Any) -> Any:
    """A status object (DaemonStatus, SourceStatus ...) as the status file's JSON shape."""
    return _converter.unstructure(status)


def write_status_file(path: Path, status: DaemonStatus) -> None:
    write_status_doc(path, unstructure(status))


def write_status_doc(path: Path, document: dict[str, Any]) -> None:
    """Replace the status file atomically (readers never see half a file). The file is the operator's:
    created 0600 (its folder 0700 when this creates it), whatever the umask."""
    make_private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an older tmp file may have been made with other bits
        f.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


def read_status_file(path: Path) -> DaemonStatus:
    return _converter.structure(orjson.loads(path.read_bytes()), DaemonStatus)
