"""When the status file (`<state_dir>/status.json`) is written, and how it is built without stalling the loop.

The file is rewritten when something an operator acts on changed, not on a clock:

- after each source's tick and each lane's run (`poke`, through FleetControls.worked), once the burst of
  work that poked has ended (reaper.quiet: in the same wake-up, never on a timer a moment later); from
  SPACED_FROM_SOURCES sources on, at most once per CHECK_PER_SOURCE_SECONDS x sources (5 s at 1000
  sources), at the first poke after that (never on a timer of its own); and every `check_seconds`
  (STATUS_CHECK_SECONDS) for what no such work announces (a sink's error, fleet membership), the writer
  compares a cheap fingerprint of that state (`status_fingerprint`: each source's status, degraded
  metrics, last error, recovery role, server version, lanes' connections and budget stretching; each
  sink's error, spilling and losses; reloads; fleet membership; the running plan) with the one of the
  last write, and writes when it differs. It has no clock of its own below that: on the machines here a
  wake-up of an idle process costs milliseconds of CPU however little it does (caches cold after a sleep),
  and a 2 s check was most of an idle daemon's CPU (docs/benchmarks.md); after a tick it runs while the
  process is awake anyway;
- the counters (ticks, rows, lateness, cost figures, `updated_wall`) are refreshed by a slow heartbeat,
  at least every STATUS_HEARTBEAT_SECONDS;
- on request: SIGUSR2 (`reaper status` sends it) writes it at once; start-up, a reload and shutdown
  write it at once too.

Building it for a large fleet costs tens of milliseconds of Python, so the build yields to the loop
every BUILD_CHUNK sources (a tick due meanwhile starts on time), and from THREAD_FROM_SOURCES sources
on, the JSON dump and the file write happen in a worker thread. Writes never overlap (one lock).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from reaper.daemon.plan import RunningState
from reaper.daemon.reconciler import Reconciler, RunningSource
from reaper.daemon.status import (
    STATUS_FILE,
    STATUS_HEARTBEAT_SECONDS,
    DaemonStatus,
    ReloadRecord,
    unstructure,
    write_status_doc,
)
from reaper.daemon.systemd import Notifier
from reaper.quiet import until_quiet
from reaper.sinks import FanOut

log = logging.getLogger("reaper.daemon.statuswrite")

STATUS_CHECK_SECONDS = 15.0  # a change that no tick or lane run announced shows within this
CHECK_PER_SOURCE_SECONDS = 0.005  # checks after work at most this often per source: 5 s at 1000 sources
SPACED_FROM_SOURCES = 100  # below, a check (under 20 us) follows every burst of work that poked
QUIET_LIMIT_SECONDS = 0.5  # a check waits at most this long for the burst that poked to end
BUILD_CHUNK = 50  # sources built between two yields to the loop
THREAD_FROM_SOURCES = 200  # from this many sources on, dump and write in a worker thread


class StatusSource(Protocol):
    """What the writer reads of the daemon (reaper.daemon.app.Daemon); a Protocol, so that this module
    does not import the one that starts it."""

    reconciler: Reconciler
    fanout: FanOut
    fleet: Any  # reaper.daemon.fleet.FleetMember | None
    reloads: int
    reload_failures: int
    last_reload: ReloadRecord | None
    state_dir: Path
    notifier: Notifier

    @property
    def stopping(self) -> bool: ...

    @property
    def sources(self) -> dict[str, RunningSource]: ...

    def summary(self) -> str: ...

    def status(self, *, with_sources: bool = True) -> DaemonStatus: ...


def _source_key(running: RunningSource) -> tuple[Hashable, ...]:
    reaper = running.reaper
    st = reaper.state
    conn = reaper.conn
    slow, local = reaper.slow, reaper.local
    factors = reaper.cost.factors
    return (st.name, st.status, tuple(sorted(st.degraded)) if st.degraded else (),
            tuple(sorted(st.slow)) if st.slow else (), st.last_error, st.in_recovery,
            st.server_version, conn is not None and not conn.is_closed,
            None if slow is None else slow.state.connected, None if local is None else local.state.connected,
            tuple(sorted(factors.items())) if factors else (), reaper.cost.heavy_paused)


def status_fingerprint(daemon: StatusSource, keys: dict[str, tuple[Hashable, ...]] | None = None
                       ) -> tuple[Hashable, ...]:
    """What an operator acts on, cheaply: equal fingerprints mean the status file would differ only in its
    counters (ticks, rows, measurements, lateness, cost figures, queue lengths, statements, timestamps).
    `keys`: each source's part as known already (the writer's, for the sources that did no work since the
    last check); what is missing there is read from the source and kept there."""
    if keys is None:
        sources = tuple(_source_key(running) for running in daemon.sources.values())
    else:
        parts = []
        for name, running in daemon.sources.items():
            key = keys.get(name)
            if key is None:
                key = keys[name] = _source_key(running)
            parts.append(key)
        sources = tuple(parts)
    sinks = tuple((o.label, o.error, o.opened, o.spilling, o.spill_bytes > 0, o.dropped, o.rejected)
                  for o in daemon.fanout.outlets)
    fleet = daemon.fleet
    members: tuple[Hashable, ...] = ()
    if fleet is not None:
        members = (fleet.session is not None, fleet.leaving, fleet.error, fleet.owned, tuple(fleet.members))
    # the running plan is rebuilt only after a change (the same object otherwise: compared by identity first)
    return (sources, sinks, members, daemon.reloads, daemon.reload_failures, daemon.last_reload,
            daemon.reconciler.running_state())


class StatusWriter:
    """The daemon's only writer of its status file."""

    def __init__(self, daemon: StatusSource, *, check_seconds: float = STATUS_CHECK_SECONDS,
                 heartbeat_seconds: float = STATUS_HEARTBEAT_SECONDS) -> None:
        self.daemon = daemon
        self.check_seconds = check_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.writes = 0
        self._wanted = trio.Event()
        self._wake = trio.Event()  # a poke or a request since the last check
        self._lock = trio.Lock()
        self._written: tuple[Hashable, ...] | None = None  # the fingerprint of the last write
        self._written_at = -math.inf  # trio time
        self._warned = False
        self._running: tuple[RunningState | None, Any] = (None, None)
        # each source's part of the fingerprint as of the last check, and the sources that worked since (None:
        # all of them): a check after a burst reads the sources of that burst only (a fleet of 1000 sources,
        # checked every 5 s, read 1000 sources each time: 4 % of its CPU per tick in bench/profile_tick.py)
        self._keys: dict[str, tuple[Hashable, ...]] = {}
        self._dirty: set[str] | None = None
        self._keys_plan: RunningState | None = None  # the running plan the keys were read under
        # called after each check (reaper.daemon.memory.Housekeeper: the daemon's memory chores, which need a
        # moment the process is awake anyway, not a task and a timer of their own)
        self.after_check: Callable[[], None] | None = None

    @property
    def path(self) -> Path:
        return self.daemon.state_dir / STATUS_FILE

    def request(self) -> None:
        """Write it now (SIGUSR2): the writer task answers at once, whatever changed."""
        self._dirty = None
        self._wanted.set()
        self._wake.set()

    def poke(self, source: str | None = None) -> None:
        """Work that may have changed the status was done (a tick, a lane's run; by `source`, or by what is not
        said): check soon."""
        if source is None:
            self._dirty = None
        elif self._dirty is not None:
            self._dirty.add(source)
        self._wake.set()

    def _fingerprint(self) -> tuple[Hashable, ...]:
        """status_fingerprint, reading again only the sources that worked since the last check (all of them
        after an unprompted wake-up, a request or a new running plan)."""
        dirty, self._dirty = self._dirty, set()
        keys, plan = self._keys, self.daemon.reconciler.running_state()
        if dirty is None or plan is not self._keys_plan or len(keys) > len(self.daemon.sources):
            keys.clear()
            self._keys_plan = plan
        else:
            for name in dirty:
                keys.pop(name, None)
        return status_fingerprint(self.daemon, keys)

    async def run(self) -> None:
        """Check after a poke (spaced for a large fleet), every check_seconds, on request; write on a change,
        on request, or when the heartbeat is due."""
        while True:
            self._wake = trio.Event()  # before the check: a poke while it writes wakes the next one
            checked = trio.current_time()
            fingerprint = self._fingerprint()
            if self._wanted.is_set() or checked - self._written_at >= self.heartbeat_seconds \
                    or fingerprint != self._written:
                self._wanted = trio.Event()
                await self.write(fingerprint)
            if self.after_check is not None:
                self.after_check()
            heartbeat = self._written_at + self.heartbeat_seconds  # not after now only when the write failed
            with trio.move_on_at(checked + self.check_seconds if heartbeat <= checked
                                 else min(checked + self.check_seconds, heartbeat)):
                await self._wake.wait()
            if not self._wake.is_set():
                self._dirty = None  # unprompted: what no tick or lane run announced (every source read again)
            if self._wanted.is_set():
                continue
            # after a poke, check when the burst of work that poked has ended (reaper.quiet), in the same
            # wake-up; a large fleet's ticks poke often: there, at the first poke once the spacing has passed
            # (work has woken the process then: a timer at the spacing's end was a wake-up of its own after most
            # bursts), or at the next unprompted check; a request at once
            sources = len(self.daemon.sources)
            if sources >= SPACED_FROM_SOURCES:
                spaced = checked + CHECK_PER_SOURCE_SECONDS * sources
                while trio.current_time() < spaced and not self._wanted.is_set():
                    self._wake = trio.Event()
                    with trio.move_on_at(checked + self.check_seconds):
                        await self._wake.wait()
                    if not self._wake.is_set():
                        self._dirty = None  # unprompted, as above
                        break
            if not self._wanted.is_set():
                await until_quiet(QUIET_LIMIT_SECONDS)

    async def write(self, fingerprint: tuple[Hashable, ...] | None = None) -> None:
        """Build the status (yielding to the loop between chunks of sources) and replace the file."""
        async with self._lock:
            if fingerprint is None:
                fingerprint = status_fingerprint(self.daemon)
            document = await self.build()
            try:
                if len(document["sources"]) >= THREAD_FROM_SOURCES:
                    await trio.to_thread.run_sync(write_status_doc, self.path, document)
                else:
                    write_status_doc(self.path, document)
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    log.warning("cannot write the status file in %s: %s", self.daemon.state_dir, e)
                return
            self._written, self._written_at = fingerprint, trio.current_time()
            self.writes += 1
            if self.daemon.notifier.enabled and not self.daemon.stopping:  # `systemctl status` shows the same
                # (reaper.daemon.systemd; once stopping, its STATUS says so until the end)
                self.daemon.notifier.status(self.daemon.summary())

    async def build(self) -> dict[str, Any]:
        """The status file's document: as `unstructure(daemon.status())`, the sources built in chunks."""
        sources = self.daemon.sources
        documents = []
        for i, name in enumerate(sorted(sources)):
            if i and i % BUILD_CHUNK == 0:
                await trio.lowlevel.checkpoint()
            running = sources.get(name)  # gone meanwhile: stopped by a reload
            if running is not None:
                documents.append(unstructure(running.reaper.status()))
        status = self.daemon.status(with_sources=False)  # updated_wall: after the sources
        document = unstructure(attrs.evolve(status, running=None))
        document["running"] = self._running_document(status.running)
        document["sources"] = documents
        return document

    def _running_document(self, running: RunningState | None) -> Any:
        """The running plan's document (1000 source descriptions take ~8 ms to unstructure): made again only
        when the reconciler describes a new one (the same object otherwise); never mutated once made."""
        if running is not self._running[0]:
            self._running = (running, unstructure(running))
        return self._running[1]
