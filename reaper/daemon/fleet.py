"""Fleet mode: several reaper processes share the sources, PostgreSQL advisory locks the arbiter.

Who should own a source is decided by rendezvous (highest-random-weight) hashing over the live
members, with bounded loads: each source key goes to the member with the highest
`weight(member, key)` among those not yet full (at most ceil(sources/members) + 1 each). Every
member reads the same member list from pg_locks and has the same sources (the same config file or
config database: members with different source lists may each leave a source to the other), so
they agree without talking to each other; when a member joins or leaves, mostly the sources it
gains or loses move. Who DOES own a source is whoever holds its advisory lock (reaper.db.fleet): a
member collects a source only while it holds that lock.

Every `refresh_seconds` a member (the `FleetMember` task):
1. reads the live members and the locks they hold (one query);
2. releases the sources it should no longer own (a member joined): the reconciler stops them first
   (their connections closed), then their locks are released;
3. claims (pg_try_advisory_lock, never waiting) the sources it should own and does not hold: a dead
   member's locks went with its session, so its sources are taken over at the survivors' next
   refresh; a source still held by its previous owner is claimed at a later refresh, once released;
4. tells the reconciler the set it owns now (`SetOwned`): the reconciler starts and stops sources.

A member whose coordination session fails (the database restarted, the network is gone, a query
outlives its deadline) stops every source at once and reconnects with backoff: its locks are gone,
so another member may claim them. `leave()` (SIGUSR1, `reaper fleet leave`) drains the member: it
stops every source, ends its session (the others take its share at their next refresh) and stays up.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import attrs
import trio

from reaper.config.schema import FleetConfig
from reaper.daemon.status import FleetMemberStatus, FleetStatus
from reaper.db.fleet import FleetSession, LiveMember, open_fleet_session, source_key
from reaper.errors import SourceUnavailable

log = logging.getLogger("reaper.daemon.fleet")

SetOwnedFn = Callable[[frozenset[str]], Awaitable[bool]]  # the reconciler's: False once shut down
Opener = Callable[..., Awaitable[FleetSession]]
WATCH_SECONDS = 0.5  # between refreshes, a closed session is noticed this fast
LOAD_SLACK = 1  # a member owns at most ceil(sources / members) + LOAD_SLACK


# -- rendezvous hashing (pure) ------------------------------------------------------------------

def weight(member: int, key: int) -> int:
    """The member's random weight for a source key: the highest weight owns it."""
    return int.from_bytes(hashlib.blake2b(f"{member}/{key}".encode(), digest_size=8).digest(), "big")


def owner_of(key: int, members: Iterable[int]) -> int | None:
    """The member that should own this key (None without members); ties go to the larger id."""
    return max(members, key=lambda m: (weight(m, key), m), default=None)


def assign_keys(keys: Iterable[int], members: Sequence[int], *, slack: int = LOAD_SLACK) -> dict[int, int]:
    """Key -> the member that should own it: rendezvous hashing with bounded loads. Each key, in
    increasing order, goes to its highest-weight member that has fewer than ceil(keys/members) + slack
    keys, so no member owns more than that (plain rendezvous hashing spreads 60 sources over 3 members
    with a standard deviation of almost 4). Pure and deterministic: every member that sees the same
    keys and members computes the same answer."""
    ordered = sorted(set(keys))
    if not members:
        return {}
    cap = -(-len(ordered) // len(members)) + slack
    load = dict.fromkeys(members, 0)
    result: dict[int, int] = {}
    for key in ordered:
        ranked = sorted(members, key=lambda m: (weight(m, key), m), reverse=True)
        owner = next(m for m in ranked if load[m] < cap)
        load[owner] += 1
        result[key] = owner
    return result


def assign(keys: Mapping[str, int], members: Sequence[int], *, slack: int = LOAD_SLACK) -> dict[str, int | None]:
    """Source name -> the member that should own it. Names with the same key go to the same member."""
    owners = assign_keys(keys.values(), members, slack=slack)
    return {name: owners.get(key) for name, key in keys.items()}


# -- the member task ----------------------------------------------------------------------------

class FleetMember:
    """This process's membership: one coordination session, the source locks it holds, and the
    requests that make the reconciler run exactly the sources whose locks it holds."""

    def __init__(self, config: FleetConfig, *, candidates: Callable[[], Iterable[str]], set_owned: SetOwnedFn,
                 opener: Opener = open_fleet_session) -> None:
        self.config = config
        self.member = config.member_name
        self.candidates = candidates  # the source names this process would run without a fleet
        self.set_owned = set_owned
        self.opener = opener
        self.session: FleetSession | None = None
        self.held: dict[int, set[str]] = {}  # key -> the names it stands for, locked by this session
        self.owned: frozenset[str] = frozenset()
        self.members: list[LiveMember] = []
        self.names_by_key: dict[int, set[str]] = {}
        self.error: str | None = None
        self.leaving = False
        self.refreshed = False  # the session's first refresh is over: its sources are claimed and started
        self._leave = trio.Event()

    def __repr__(self) -> str:
        state = "leaving" if self.leaving else ("connected" if self.session else "disconnected")
        return f"<FleetMember {self.member} {state} members={len(self.members)} owned={len(self.owned)}>"

    def leave(self) -> None:
        """Drain: release every source and leave the fleet; the process stays up."""
        self._leave.set()

    @property
    def draining(self) -> bool:
        """Asked to leave (SIGUSR1, `reaper fleet leave`): draining now or left (`leaving`) already."""
        return self._leave.is_set() or self.leaving

    def status(self) -> FleetStatus:
        members = []
        for m in self.members:
            names = sorted(n for k in m.source_keys for n in self.names_by_key.get(k, ()))
            members.append(FleetMemberStatus(name=m.name, pid=m.pid, sources=tuple(names),
                                             this=self.session is not None and m.pid == self.session.pid))
        return FleetStatus(member=self.member, connected=self.session is not None, leaving=self.leaving,
                           refresh_seconds=self.config.refresh_seconds, owned=len(self.owned),
                           members=tuple(members), error=self.error)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = 1.0
        while not self._leave.is_set():
            try:
                await self._connected_member()
                backoff = 1.0
            except SourceUnavailable as e:
                if self.error != str(e):
                    log.error("fleet %s: %s; collecting nothing until the coordination database answers "
                              "(retrying with backoff)", self.member, e)
                self.error = str(e)
            if self._leave.is_set():
                break
            with trio.move_on_after(backoff):
                await self._leave.wait()
            backoff = min(backoff * 2, max(self.config.refresh_seconds, 1.0))
        self.leaving = True
        log.warning("fleet %s: left the fleet (drained): collecting nothing, staying up", self.member)
        await trio.sleep_forever()

    async def _connected_member(self) -> None:
        """One session's life: connect, refresh until it fails or the member leaves, then stop every
        source (before any other member can have been told its locks are free, as far as we can)."""
        timeout = self.config.connect_timeout_seconds
        with trio.fail_after(timeout):
            try:
                session = await self.opener(self.config.dsn, self.member, password_file=self.config.password_file,
                                            statement_timeout_seconds=self._deadline())
            except trio.TooSlowError:
                raise SourceUnavailable(f"fleet coordination database: no connection within {timeout:g}s") from None
        self.session = session
        if self.error is not None:
            log.warning("fleet %s: coordination database reached again", self.member)
        self.error = None
        log.info("fleet %s: joined (session pid %d)", self.member, session.pid)
        try:
            while not self._leave.is_set():
                await self._refresh(session)
                self.refreshed = True
                await self._wait_next(session)
        except trio.TooSlowError:
            raise SourceUnavailable(f"fleet coordination database: no answer within {self._deadline():g}s") from None
        finally:
            self.session = None
            self.refreshed = False
            self.held.clear()
            self.members = []  # without a session this member knows of no live member (itself included)
            try:
                await self._apply(frozenset())  # every source stops (its connection closed) first,
            finally:
                await session.close()  # then the session (and every lock it held) ends

    def _deadline(self) -> float:
        return max(self.config.refresh_seconds / 2, 0.5)

    async def _wait_next(self, session: FleetSession) -> None:
        with trio.move_on_after(self.config.refresh_seconds):
            while not session.lost():
                with trio.move_on_after(WATCH_SECONDS):
                    await self._leave.wait()
                    return
            raise SourceUnavailable("fleet coordination database: the session was closed")

    async def _refresh(self, session: FleetSession) -> None:
        with trio.fail_after(self._deadline()):
            members = await session.members()
        if not any(m.pid == session.pid for m in members):
            raise SourceUnavailable("fleet coordination database: this member's lock is gone")
        names = list(dict.fromkeys(self.candidates()))
        keys = {n: source_key(n) for n in names}
        self.names_by_key = {}
        for n, k in keys.items():
            self.names_by_key.setdefault(k, set()).add(n)
        if [m.id for m in members] != [m.id for m in self.members]:
            log.info("fleet %s: %d live members: %s", self.member, len(members),
                     ", ".join(m.name or str(m.id) for m in members))
        self.members = members
        owners = assign_keys(self.names_by_key, [m.id for m in members])
        should = {k for k, owner in owners.items() if owner == session.id}
        release = set(self.held) - should
        if release:
            await self._apply(self._names(set(self.held) & should))  # stopped (connections closed) first
            with trio.fail_after(self._deadline()):
                await session.release(release)
            for k in release:
                self.held.pop(k, None)
        claim = should - set(self.held)
        if claim:
            with trio.fail_after(self._deadline()):
                got = await session.try_claim(claim)
            for k in got:
                self.held[k] = set()
        for k in self.held:
            self.held[k] = self.names_by_key.get(k, set())
        # this member's own entry shows what it holds now, not what it held when the list was read
        self.members = [attrs.evolve(m, source_keys=frozenset(self.held)) if m.pid == session.pid else m
                        for m in members]
        await self._apply(self._names(set(self.held)))

    def _names(self, keys: set[int]) -> frozenset[str]:
        return frozenset(n for k in keys for n in self.names_by_key.get(k, ()))

    async def _apply(self, owned: frozenset[str]) -> None:
        if owned == self.owned:
            return
        gained, lost = len(owned - self.owned), len(self.owned - owned)
        if await self.set_owned(owned):
            log.info("fleet %s: owns %d sources (%d taken, %d released)", self.member, len(owned), gained, lost)
        self.owned = owned
