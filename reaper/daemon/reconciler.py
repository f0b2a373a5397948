"""The reconciler: the one task that owns and changes the running state.

Running state = the concrete sources (`sources`), the discovery sources (`parents`) with the list of
children each last found, the sinks (through `SinkSet.apply`), the applied config and catalogue,
and the fleet switches (pause, minimum database size). Nothing else writes them. Everything that
wants a change sends a request over one bounded channel and the reconciler applies the requests one
at a time, so no two changes interleave:

- `ApplyConfig`   a reload (already validated as a whole): `reaper.daemon.plan.plan_reload` compares
                  the running state's description with the new config, and the reconciler carries
                  the plan out: start what is missing, stop what is extra, restart what changed its
                  connection settings, update in place (`SourceReaper.update`) what changed otherwise.
                  `reaper reload --plan` runs the same function on the status file's description.
                  The requester waits for the `ReloadOutcome` (counts and the plan).
- `Discovered`    a discovery source's task only RESOLVES its list and sends it; the reconciler
                  applies it to that parent's children. A list from a parent that was removed or
                  replaced meanwhile (its generation is stale) is ignored.
- `FeedListed`    a `[[sources_from]]` feed's task read its config database (reaper.daemon.sources_from):
                  the file's sources and every feed's are merged and applied like a reload.
- `SetPaused`     the pause file appeared or went away.
- `Shutdown`      stop every source (their connections are closed before `stopped` is set).

A source is registered only after its task has started (`nursery.start` returned), and is
deregistered only by the reconciler, which waits until its task has finished before it answers the
next request: one name never has two collectors.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping

import attrs
import trio

from reaper.catalog.metrics import Catalog
from reaper.config.schema import Config, SourceConfig
from reaper.daemon.cost import CostSettings
from reaper.daemon.plan import Plan, RunningState, SourcePlan, compare_source, describe, describe_source, plan_reload
from reaper.daemon.sinkset import SinkSet
from reaper.daemon.source import FleetControls, SourceReaper, supervise
from reaper.daemon.sources_from import FeedListed, Feeds
from reaper.db.rows import RowLimit
from reaper.errors import SourceUnavailable
from reaper.kinds import is_discovery, resolve

log = logging.getLogger("reaper.daemon.reconciler")

Resolver = Callable[[SourceConfig], Awaitable[list[SourceConfig]]]
SourceFactory = Callable[[SourceConfig, Catalog], SourceReaper]
SourceRunner = Callable[..., Awaitable[None]]  # supervise(reaper, *, task_status)
REQUEST_CAPACITY = 64


# -- requests -------------------------------------------------------------------------------------

@attrs.frozen
class ReloadOutcome:
    added: int = 0
    removed: int = 0
    restarted: int = 0
    updated: int = 0
    unchanged: int = 0
    sinks_added: int = 0
    sinks_removed: int = 0
    sinks_rebuilt: int = 0
    plan: Plan | None = attrs.field(default=None, eq=False)  # what was done, in detail

    def summary(self) -> str:
        return (f"sources {self.added} added, {self.removed} removed, {self.restarted} restarted, "
                f"{self.updated} updated, {self.unchanged} unchanged; sinks {self.sinks_added} added, "
                f"{self.sinks_removed} removed, {self.sinks_rebuilt} rebuilt")


@attrs.define(eq=False)
class ApplyConfig:
    config: Config
    done: trio.Event = attrs.field(factory=trio.Event)
    outcome: ReloadOutcome | None = None


@attrs.frozen
class Discovered:
    parent: str
    generation: int
    found: tuple[SourceConfig, ...]


@attrs.frozen
class SetPaused:
    paused: bool


@attrs.frozen
class Shutdown:
    pass


@attrs.define(eq=False)
class SetOwned:
    """Fleet mode ([fleet]): the sources whose advisory locks this member holds now
    (reaper.daemon.fleet). Only those run; the requester waits, so that it releases a lock only
    after its source has stopped (its connection closed)."""

    owned: frozenset[str]
    done: trio.Event = attrs.field(factory=trio.Event)


Request = ApplyConfig | Discovered | SetPaused | Shutdown | FeedListed | SetOwned


# -- what runs ------------------------------------------------------------------------------------

@attrs.define(eq=False)
class RunningSource:
    config: SourceConfig
    catalog: Catalog
    reaper: SourceReaper
    scope: trio.CancelScope
    done: trio.Event
    parent: str | None = None  # the discovery source that found it


@attrs.define(eq=False)
class RunningParent:
    """A discovery source (postgres-discovery, patroni): it collects nothing itself; its task
    resolves the list of concrete sources it stands for, every discovery_interval_seconds and when
    woken (reload), and sends it to the reconciler."""

    config: SourceConfig
    generation: int  # a list sent by an older generation of this name is stale
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    children: dict[str, SourceConfig] = attrs.field(factory=dict)  # the last list applied
    wake: trio.Event = attrs.field(factory=trio.Event)
    error: str | None = None  # written by its own task: why the last resolve failed
    clashes: set[str] = attrs.field(factory=set)  # children skipped because the name is taken (logged once)


class Reconciler:
    """Applies requests one at a time to the running sources, discovery parents and sinks."""

    def __init__(self, config: Config, *, make_source: SourceFactory, controls: FleetControls,
                 sinks: SinkSet | None = None, groups: Iterable[str] = (), resolver: Resolver = resolve,
                 run_source: SourceRunner = supervise) -> None:
        self.config = config
        self.catalog = Catalog.for_config(config)
        self.make_source = make_source
        self.controls = controls
        self.sinks = sinks
        self.groups = frozenset(groups)
        self.resolver = resolver
        self.run_source = run_source
        self.sources: dict[str, RunningSource] = {}
        self.parents: dict[str, RunningParent] = {}
        self.stopped = trio.Event()
        self._send, self._receive = trio.open_memory_channel[Request](REQUEST_CAPACITY)
        self._nursery: trio.Nursery | None = None
        self._generation = 0
        self.feeds = Feeds(config)  # [[sources_from]]: self.config is the file's config with their sources
        # fleet mode: the sources this member owns (none until it has claimed some); None: no fleet
        self.owned: frozenset[str] | None = frozenset() if config.fleet is not None else None
        self.salt = secrets.token_hex(8)  # for the hashes of DSNs in the running state's description
        self._described: RunningState | None = None

    def __repr__(self) -> str:
        return f"<Reconciler sources={len(self.sources)} parents={len(self.parents)}>"

    def wanted_sources(self, config: Config) -> dict[str, SourceConfig]:
        """The sources this process runs: enabled, in one of --group's groups when given, and in a
        fleet, owned by this member."""
        return {name: s for name, s in self.candidates(config).items()
                if self.owned is None or name in self.owned}

    def candidates(self, config: Config) -> dict[str, SourceConfig]:
        """The sources this process would run on its own (a fleet member claims among these)."""
        return {s.name: s for s in config.sources
                if s.enabled and (not self.groups or s.group in self.groups)}

    def running_state(self) -> RunningState:
        """The description of what runs (for the status file and for planning a reload); rebuilt only
        after a request changed something."""
        if self._described is None:
            configured = [r.config for r in self.sources.values() if r.parent is None]
            configured += [p.config for p in self.parents.values()]
            sinks = [r.config for r in self.sinks.sinks.values() if r.config is not None] if self.sinks else []
            discovered = {name: r.parent for name, r in self.sources.items() if r.parent is not None}
            in_file = {s.name for s in self.feeds.file_config.sources}
            fed = [s.name for s in self.config.sources if s.name not in in_file]
            self._described = describe(self.config, self.catalog, self.salt, groups=sorted(self.groups),
                                       owned=self.owned, sources=configured, discovered=discovered, sinks=sinks,
                                       fed=fed)
        return self._described

    # -- the requesters' side --------------------------------------------------------------------

    async def submit(self, request: Request) -> bool:
        """Queue a request; False once the reconciler has stopped (shutdown)."""
        try:
            await self._send.send(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def apply(self, config: Config) -> ReloadOutcome | None:
        """Apply a validated config and wait for the outcome (None when shutting down)."""
        request = ApplyConfig(config)
        if not await self.submit(request):
            return None
        await request.done.wait()
        return request.outcome

    # -- the task ---------------------------------------------------------------------------------

    async def run(self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start the configured sources in `nursery` (the sources nursery), report started, then
        apply requests until Shutdown."""
        self._nursery = nursery
        try:
            for source in self.wanted_sources(self.config).values():
                await self._start(source)
            await self.feeds.start(nursery, self._send, lambda: self.catalog)
            self._described = None
            log.info("collecting: %d sources, %d discovery sources, %d sinks", len(self.sources),
                     len(self.parents), len(self.sinks.sinks) if self.sinks else 0)
            task_status.started()
            while True:
                request = await self._receive.receive()
                if isinstance(request, Shutdown):
                    await self._stop_all()
                    return
                await self._handle(request)
        finally:
            self._receive.close()
            self.stopped.set()

    async def _handle(self, request: Request) -> None:
        if isinstance(request, ApplyConfig):
            self.running_state()  # while a reload is applied, the status file shows the state before it
        try:
            await self._apply_request(request)
        finally:
            self._described = None  # rebuilt when next asked

    async def _apply_request(self, request: Request) -> None:
        if isinstance(request, ApplyConfig):
            try:
                request.outcome = await self._apply_config(await self.feeds.sync(request.config))
            finally:
                request.done.set()
        elif isinstance(request, Discovered):
            parent = self.parents.get(request.parent)
            if parent is None or parent.generation != request.generation:
                log.debug("source %s: a stale discovery result (generation %d) ignored", request.parent,
                          request.generation)
                return
            await self._apply_children(parent, {c.name: c for c in request.found})
        elif isinstance(request, FeedListed):
            if (label := self.feeds.accept(request)) is not None:
                outcome = await self._apply_config(self.feeds.merged())
                log.info("sources from %s: %s", label, outcome.summary())
        elif isinstance(request, SetPaused) and request.paused != self.controls.paused:
            self.controls.paused = request.paused
            if request.paused:
                log.warning("pause file %s exists: every source stops querying and closes its connection "
                            "until it is removed", self.config.collector.pause_file)
            else:
                log.warning("pause file removed: collection resumes")
        elif isinstance(request, SetOwned):
            try:
                await self._apply_owned(request.owned)
            finally:
                request.done.set()

    async def _apply_owned(self, owned: frozenset[str]) -> None:
        """Fleet mode: stop the sources this member no longer owns, start those it owns now."""
        self.owned = owned
        wanted = self.wanted_sources(self.config)
        extra = [n for n, r in self.sources.items() if r.parent is None and n not in wanted]
        await self._stop_many(extra + [n for n in self.parents if n not in wanted], "fleet: not this member's")
        for name, source in wanted.items():
            if name not in self.sources and name not in self.parents:
                await self._start(source)

    # -- reload ----------------------------------------------------------------------------------

    async def _apply_config(self, new: Config) -> ReloadOutcome:
        plan = plan_reload(self.running_state(), new)
        steps = {p.name: p for p in plan.sources}
        counts: dict[str, int] = dict.fromkeys(attrs.fields_dict(ReloadOutcome), 0)
        del counts["plan"]
        for step in plan.sources:
            if step.action == "removed":
                await self._stop_many([step.name], "reload: removed")
            elif step.action == "restarted" and (step.name in self.parents) != step.discovery:
                await self._stop_many([step.name], "reload: kind changed")
        if self.sinks is not None:
            added, removed, rebuilt = await self.sinks.apply(new.sinks, new.collector)
            counts.update(sinks_added=added, sinks_removed=removed, sinks_rebuilt=rebuilt)
        self.config, self.catalog = new, Catalog.for_config(new)
        self.controls.min_db_size_mb = new.collector.min_db_size_mb
        RowLimit.value = new.collector.max_rows_per_metric  # each connection's next statement asks for it
        self.controls.cost = CostSettings.of(new.collector)
        for name, source in self.wanted_sources(new).items():
            await self._apply_one(source, steps[name])
        for step in plan.sources:
            counts[step.action] += 1
        for running in self.sources.values():  # a source stopped after crashing again and again tries again
            if (retry := running.reaper.state.retry) is not None:
                retry.set()
        return ReloadOutcome(**counts, plan=plan)

    async def _apply_one(self, source: SourceConfig, step: SourcePlan) -> None:
        """Carry out the plan's step for one configured source."""
        name = source.name
        if is_discovery(source):
            parent = self.parents.get(name)
            if parent is None:
                await self._start(source)
            elif step.config_changed:  # a new generation: a list resolved with the old config is stale
                await self._replace_parent(parent, source)
            else:
                parent.wake.set()  # discovery runs again at once; its children follow the new catalogue
            return
        running = self.sources.get(name)
        if running is not None and running.parent is not None:  # a configured source takes a found one's name
            log.warning("source %s: configured now; it was found by %s, which no longer owns it", name,
                        running.parent)
            if (finder := self.parents.get(running.parent)) is not None:
                finder.children.pop(name, None)  # out of its list before it stops
            await self._stop_many([name], "configured explicitly")
            running = None
        if running is None:
            await self._start(source)
        else:
            await self._carry_out(name, source, step)

    async def _update(self, name: str, source: SourceConfig) -> str:
        """A running concrete source's new config: 'restarted', 'updated' or 'unchanged'."""
        running = self.sources[name]
        step = compare_source(describe_source(running.config, running.catalog, self.salt),
                              describe_source(source, self.catalog, self.salt))
        await self._carry_out(name, source, step)
        return step.action

    async def _carry_out(self, name: str, source: SourceConfig, step: SourcePlan) -> None:
        running = self.sources[name]
        if step.action == "restarted":
            await self._stop_many([name], f"connection settings changed: {', '.join(step.reasons)}")
            await self._start(source, running.parent)
        elif step.action == "updated" or running.catalog != self.catalog or running.config != source:
            # "unchanged" here may still hold a new catalogue object (a metric it does not use changed):
            # the source takes it, which changes nothing it does
            running.reaper.update(source, self.catalog)
            running.config, running.catalog = source, self.catalog

    # -- discovery -------------------------------------------------------------------------------

    async def _apply_children(self, parent: RunningParent, found: Mapping[str, SourceConfig]) -> None:
        name = parent.config.name
        mine = [c for c, r in self.sources.items() if r.parent == name]
        gone = [c for c in mine if c not in found]
        # parent.children stays true at every await (a reader, e.g. the status file, may look in between):
        # a gone child leaves the list before it is stopped, a new one enters it as it starts
        for child in gone:
            parent.children.pop(child, None)
        await self._stop_many(gone, f"no longer found by {name}")
        new = 0
        for child, config in found.items():
            running = self.sources.get(child)
            if running is not None and running.parent == name:
                parent.children[child] = config
                await self._update(child, config)
            elif running is not None or child in self.parents:
                parent.children.pop(child, None)
                if child not in parent.clashes:
                    parent.clashes.add(child)
                    log.error("source %s: found %s, but a source of that name exists already; skipped", name, child)
            else:
                parent.children[child] = config
                try:
                    await self._start(config, name)
                finally:
                    if child not in self.sources:
                        parent.children.pop(child, None)
                new += 1
        parent.children = {c: cfg for c, cfg in found.items()
                           if (r := self.sources.get(c)) is not None and r.parent == name}
        if gone or new:
            log.info("source %s: %d sources (%d new, %d gone)", name, len(parent.children), new, len(gone))

    async def _parent_task(self, parent: RunningParent, send: trio.MemorySendChannel[Request], *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resolve the parent's list now, then every discovery_interval_seconds or when woken; send
        each list to the reconciler. Changes nothing itself."""
        name = parent.config.name
        try:
            with send, parent.scope:
                task_status.started()
                while True:
                    try:
                        found = await self.resolver(parent.config)
                    except SourceUnavailable as e:
                        if parent.error is None:
                            log.error("source %s: discovery failed: %s; keeping the last known %d sources",
                                      name, e, len(parent.children))
                        parent.error = str(e)
                    except Exception as e:  # a bug (or data it cannot handle): said once with its traceback
                        if parent.error != repr(e):
                            log.exception("source %s: discovery failed unexpectedly (a bug); keeping the last known "
                                          "%d sources", name, len(parent.children))
                        parent.error = repr(e)
                    else:
                        if parent.error is not None:
                            log.warning("source %s: discovery works again", name)
                        parent.error = None
                        await send.send(Discovered(name, parent.generation, tuple(found)))
                    with trio.move_on_after(parent.config.discovery_interval_seconds):
                        await parent.wake.wait()
                    parent.wake = trio.Event()
        finally:
            parent.done.set()

    # -- starting and stopping -------------------------------------------------------------------

    async def _start(self, config: SourceConfig, parent: str | None = None,
                     children: dict[str, SourceConfig] | None = None) -> None:
        """Start a source's task; register it once started."""
        assert self._nursery is not None, "run() first"
        if is_discovery(config):
            self._generation += 1
            running_parent = RunningParent(config, self._generation, children=children or {})
            await self._nursery.start(self._parent_task, running_parent, self._send.clone())
            self.parents[config.name] = running_parent
            return
        reaper = self.make_source(config, self.catalog)
        running = RunningSource(config, self.catalog, reaper, trio.CancelScope(), trio.Event(), parent)
        await self._nursery.start(self._source_task, running)
        self.sources[config.name] = running

    async def _source_task(self, running: RunningSource, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:
                await self.run_source(running.reaper, task_status=task_status)
        finally:
            running.done.set()

    async def _replace_parent(self, parent: RunningParent, config: SourceConfig) -> None:
        """A discovery source whose config changed: a new task (a new generation) resolves at once;
        its children keep running until its first list says otherwise."""
        parent.scope.cancel()  # it stays registered (its children run for it) until the new one replaces it
        await parent.done.wait()
        await self._start(config, children=parent.children)

    async def _stop_all(self) -> None:
        """Shutdown: stop every task at once. They stay registered (stopped), so that the last status
        file still counts what each source collected."""
        log.info("shutting down: stopping %d sources", len(self.sources))
        await self.feeds.stop_all()
        tasks: list[RunningParent | RunningSource] = [*self.parents.values(), *self.sources.values()]
        for task in tasks:
            task.scope.cancel()
        for task in tasks:
            await task.done.wait()

    async def _stop_many(self, names: Iterable[str], reason: str) -> None:
        """Stop sources (a discovery source: with every source it found) at once; each one's task
        (and so its connection) has finished when this returns."""
        waiting: list[RunningParent | RunningSource] = []
        for name in list(names):
            parent = self.parents.pop(name, None)
            if parent is not None:
                parent.scope.cancel()
                waiting.append(parent)
                children = [c for c, r in self.sources.items() if r.parent == name]
                names_and_reasons = [(c, f"{reason}: {name} stopped") for c in children]
            else:
                names_and_reasons = [(name, reason)]
            for source_name, why in names_and_reasons:
                running = self.sources.pop(source_name, None)
                if running is None:
                    continue
                log.info("source %s: stopping (%s)", source_name, why)
                running.scope.cancel()
                waiting.append(running)
        for item in waiting:
            await item.done.wait()
