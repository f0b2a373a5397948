"""A source's shared pieces: the fleet-wide switches it obeys, how it connects, what it shows operators."""

from __future__ import annotations

import logging
import struct
from array import array
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import attrs
import outcome
import trio

from reaper import db
from reaper.config.schema import SourceConfig
from reaper.daemon.alarms import Alarms
from reaper.daemon.cost import CostSettings
from reaper.daemon.status import LATENESS_BOUNDS, LatenessBuckets
from reaper.db.link import SourceLink
from reaper.errors import SourceUnavailable
from reaper.schedule import PHASE_SPREAD

log = logging.getLogger("reaper.daemon.source")  # (its lines are the source loop's)

MAX_PARALLEL_CONNECTS = 32
CONNECT_TURN_SECONDS = 1.0  # a connect holds its turn this long at most (connect_in_turn)
LATENESS_SAMPLES = 256  # the recent ticks whose lateness status reports (p50, p99, max)


def _nothing(source: str | None = None) -> None:
    pass


@attrs.define(eq=False)
class FleetControls:
    """Daemon-wide switches every source obeys (emergency pause, minimum database size)."""

    paused: bool = False
    min_db_size_mb: int = 0
    create_extensions: tuple[str, ...] = ()
    phase_spread: float = PHASE_SPREAD  # seconds over which the sources' ticks are spread
    fleet_size: int = 0  # the sources the daemon runs (their ticks share a grid: reaper.schedule.tick_slot_seconds)
    cost: CostSettings = attrs.field(factory=CostSettings)  # [collector]'s server budget (reaper.daemon.cost)
    # at most this many sources connect at the same moment (a fleet's start must not storm the servers)
    connects: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(MAX_PARALLEL_CONNECTS))
    # every source's ticks: how late they started (status, `reaper status`, reaper_tick_lateness_seconds)
    lateness: LatenessHistogram = attrs.field(factory=lambda: LatenessHistogram())
    # called after each tick and lane run: the status file's writer checks then (reaper.daemon.statuswrite)
    worked: Callable[[str | None], None] = _nothing  # (the source that worked; None: not said)
    alarms: Alarms = attrs.field(factory=Alarms)  # the sources' next ticks, on one timer (the daemon runs it)
    rejected_dir: Path | None = None  # rows a bug in reaper failed on (reaper.daemon.delivery.Output.bug)


async def connect_in_turn(controls: FleetControls, config: SourceConfig,
                          connector: Callable[[SourceConfig], Awaitable[SourceLink]]) -> SourceLink:
    """Connect once the fleet's connect limiter gives a turn; the timeout counts from the turn.

    The limiter keeps a fleet's start from storming its servers: what costs there (TLS, authentication)
    is a connect's first moments. A connect still pending after CONNECT_TURN_SECONDS (a host that drops
    the packets, a server that accepts and never answers) gives its turn back and goes on waiting: such
    hosts, hundreds of them when a data centre is cut off, held every turn for their whole connect
    timeout, and a healthy source's reconnect (a failover, a reload) queued behind them for minutes."""
    token = object()
    await controls.connects.acquire_on_behalf_of(token)
    held = True

    def give_back() -> None:
        nonlocal held
        if held:
            held = False
            controls.connects.release_on_behalf_of(token)

    async def turn_over() -> None:
        await trio.sleep(CONNECT_TURN_SECONDS)
        give_back()

    async def connect() -> SourceLink:
        try:
            with trio.fail_after(config.connect_timeout_seconds):
                return await connector(config)
        except trio.TooSlowError as e:
            raise SourceUnavailable(f"connect timed out after {config.connect_timeout_seconds:g}s") from e

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(turn_over)
            result = await outcome.acapture(connect)  # (raised in the nursery, it would come out in a group)
            nursery.cancel_scope.cancel()
    finally:
        give_back()
    return result.unwrap()


async def connect_source(config: SourceConfig, *, application_name: str = db.APPLICATION_NAME) -> SourceLink:
    """A connection fit for the source's kind: PostgreSQL (one combined statement per tick), or a
    pooler's admin console (PgBouncer, Pgpool-II: the simple query protocol, one command per metric)."""
    if config.kind == "pgbouncer" or config.kind == "pgpool":
        from reaper.db.simple import open_simple_connection

        return await open_simple_connection(config.dsn, kind=config.kind,
                                            statement_timeout_seconds=config.query_timeout_seconds,
                                            password_file=config.password_file,
                                            application_name=application_name)
    return await db.open_source_connection(
        config.dsn, statement_timeout_seconds=config.query_timeout_seconds,
        password_file=config.password_file, application_name=application_name,
        lock_timeout_seconds=config.lock_timeout_seconds, search_path=config.search_path)


class LatenessHistogram:
    """How late the ticks of all sources started, counted in fixed buckets (LATENESS_BOUNDS) since the
    daemon started: one bisect and one increment per tick, a fleet-wide p99 for any window from two
    snapshots (a source's own ring, `Recent`, holds too few ticks of a slow interval for a p99)."""

    __slots__ = ("_counts", "_sum")

    def __init__(self) -> None:
        self._counts = array("q", bytes(8 * (len(LATENESS_BOUNDS) + 1)))  # the last one: over every bound
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(LATENESS_BOUNDS, seconds)] += 1
        self._sum += seconds

    def snapshot(self) -> LatenessBuckets:
        cumulative, total = [], 0
        for count in self._counts:
            total += count
            cumulative.append(total)
        return LatenessBuckets(le=LATENESS_BOUNDS, counts=tuple(cumulative), sum=self._sum)


_HALF = struct.Struct("e")  # IEEE 754 half precision: 11 significant bits, up to 65504
_BITS = struct.Struct("H")


class Recent:
    """The last `size` floats appended (the ticks' lateness, seconds), oldest first: a ring in an array,
    allocated once, 2 bytes a value (a half float: a deque of floats keeps ~32 bytes a value, 1000 sources
    x 256 samples). 11 significant bits: 12.3456 ms of lateness reads back as 12.344 ms, 1.2345 s as
    1.2344 s, far finer than status shows; beyond 65504 s it reads 65504."""

    __slots__ = ("_count", "_next", "_values")

    def __init__(self, size: int = LATENESS_SAMPLES) -> None:
        self._values = array("H", [0]) * size
        self._next = 0
        self._count = 0

    def append(self, value: float) -> None:
        self._values[self._next] = _BITS.unpack(_HALF.pack(max(-65504.0, min(value, 65504.0))))[0]
        self._next = (self._next + 1) % len(self._values)
        self._count = min(self._count + 1, len(self._values))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[float]:
        values = self._values
        ordered = values[:self._count] if self._count < len(values) else values[self._next:] + values[:self._next]
        return iter(struct.unpack(f"{len(ordered)}e", ordered.tobytes()))


@attrs.define(eq=False)
class SourceState:
    """What an operator (status, demo, self-metrics) can see of a source."""

    name: str
    status: str = "starting"  # starting | up | down | skipped | paused | restarting | crashed
    ticks: int = 0
    measurements: int = 0
    rows: int = 0
    metric_errors: int = 0
    last_tick_wall: float | None = None
    next_tick: float | None = None  # trio clock
    last_error: str | None = None
    in_recovery: bool | None = None
    server_version: str | None = None
    degraded: set[str] = attrs.field(factory=set)
    slow: set[str] = attrs.field(factory=set)  # batch members too slow for the batch (reaper.daemon.metrichealth)
    lateness: Recent = attrs.field(factory=Recent)  # the last LATENESS_SAMPLES ticks'
    statements_last_tick: int = 0  # the fast lane's
    statements_total: int = 0  # the fast lane's, since start
    last_fetch: dict[str, float] = attrs.field(factory=dict)  # metric -> trio time it last completed
    metric_rows: dict[str, int] = attrs.field(factory=dict)  # metric -> rows in its last measurement
    metric_measurements: dict[str, int] = attrs.field(factory=dict)  # metric -> measurements delivered
    retry: trio.Event | None = None  # set by a reload: a source stopped after crashing again and again tries again


def say_reconnected(name: str, before: db.ServerInfo, server: db.ServerInfo, product: str,
                    said: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """Log a connection made again after the last one was found closed before a tick; `said` gains ("", "idle")
    once the same server's closing of idle connections was explained (then at debug level: a server ending idle
    sessions would have it said at every tick). A restart or a failover in between is said every time."""
    if (before.address, before.started) != (server.address, server.started):
        log.info("source %s: connected again, to %s (%s, database %s%s)", name, "a restarted server"
                 if before.address == server.address else f"{server.address} (was {before.address})", product,
                 server.database, ", in recovery" if server.in_recovery else "")
        return said
    if server.idle_session_timeout:
        why = (f"the server ends sessions idle for {server.idle_session_timeout} (idle_session_timeout), shorter "
               "than this source's pauses between ticks, so reaper connects for each tick after one; `ALTER ROLE "
               "<reaper's role> SET idle_session_timeout = 0` keeps its connection")
    else:
        why = "the idle connection was closed by the server or something on the way (a pooler, a firewall)"
    log.log(logging.DEBUG if ("", "idle") in said else logging.INFO,
            "source %s: connected again: %s (later reconnections like this one are logged at debug level)",
            name, why)
    return said | {("", "idle")}


def say_extensions(name: str, before: db.ServerInfo, server: db.ServerInfo,
                   said: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """Log the extensions created or dropped in a source's database while reaper collects (the metrics that need
    them start or stop at once); each metric skipped for want of an extension is said again if it is once more."""
    created, dropped = sorted(server.extensions - before.extensions), sorted(before.extensions - server.extensions)
    for names, what, then in ((created, "created", "collect"), (dropped, "dropped", "are skipped")):
        if names:
            log.info("source %s: extension %s %s in database %s: the metrics that need %s %s from now on", name,
                     ", ".join(names), what, server.database, "it" if len(names) == 1 else "them", then)
    return frozenset(k for k in said if k[1] != "extension")
