"""The reconciler, the one writer of running state, under trio's MockClock with fakes.

Discovery refreshes (a scripted resolver with scripted delays) race reloads that add, change and
remove their parent. After every interleaving: no orphan (every running source is wanted by the
config or by a live parent's last list) and no double collector (never two tasks, never two open
connections for one source name).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import trio
import trio.lowlevel
import trio.testing
from fakes import FakeConnection, sql_metric

from reaper.catalog.metrics import Catalog
from reaper.config.schema import Config, SourceConfig
from reaper.daemon.reconciler import Reconciler, ReloadOutcome, SetPaused, Shutdown
from reaper.daemon.source import FleetControls, SourceReaper, supervise
from reaper.errors import SourceUnavailable

PING = sql_metric("ping")


@attrs.define(eq=False)
class CountedConnection(FakeConnection):
    """A fake connection that tells its connector when it is closed (once)."""

    owner: Any = None
    name: str = ""

    def _release(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.opened[self.name] -= 1

    def terminate(self) -> None:
        self._release()

    async def close(self) -> None:
        self._release()


@attrs.define(eq=False)
class CountingConnector:
    """Hands out one new connection per connect and counts the open ones per source name."""

    opened: Counter[str] = attrs.field(factory=Counter)
    most: Counter[str] = attrs.field(factory=Counter)  # the most connections ever open at once per name

    async def __call__(self, config: SourceConfig) -> CountedConnection:
        await trio.lowlevel.checkpoint()
        self.opened[config.name] += 1
        self.most[config.name] = max(self.most[config.name], self.opened[config.name])
        return CountedConnection(owner=self, name=config.name)

    def open_names(self) -> set[str]:
        return {name for name, n in self.opened.items() if n > 0}


@attrs.define(eq=False)
class ScriptedResolver:
    """The databases a discovery source finds: `databases` now, after a scripted delay; fails at times."""

    rng: random.Random
    databases: set[str] = attrs.field(factory=set)
    delays: tuple[float, ...] = (0.0,)
    failure_rate: float = 0.0
    calls: int = 0

    async def __call__(self, source: SourceConfig) -> list[SourceConfig]:
        self.calls += 1
        await trio.sleep(self.rng.choice(self.delays))
        if self.rng.random() < self.failure_rate:
            raise SourceUnavailable("connection refused")
        return [attrs.evolve(source, name=f"{source.name}_{db}", kind="postgres", dsn=f"postgresql://fake/{db}")
                for db in sorted(self.databases)]


@attrs.define(eq=False)
class Harness:
    """A reconciler over fakes; counts the collector tasks running per name."""

    connector: CountingConnector = attrs.field(factory=CountingConnector)
    running: Counter[str] = attrs.field(factory=Counter)
    most_running: Counter[str] = attrs.field(factory=Counter)
    controls: FleetControls = attrs.field(factory=FleetControls)

    def make_source(self, config: SourceConfig, catalog: Catalog) -> SourceReaper:
        return SourceReaper(config, catalog, lambda m: None, connector=self.connector, controls=self.controls)

    async def run_source(self, reaper: SourceReaper, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        name = reaper.config.name
        self.running[name] += 1
        self.most_running[name] = max(self.most_running[name], self.running[name])
        try:
            await supervise(reaper, task_status=task_status)
        finally:
            self.running[name] -= 1

    def reconciler(self, config: Config, resolver: Callable[..., Any]) -> Reconciler:
        return Reconciler(config, make_source=self.make_source, controls=self.controls, resolver=resolver,
                          run_source=self.run_source)


def config(*sources: SourceConfig) -> Config:
    return Config(sources=sources, metrics={"ping": PING})


def plain(name: str, **kwargs: Any) -> SourceConfig:
    return SourceConfig(name=name, dsn=f"postgresql://fake/{name}", metrics={"ping": 1}, **kwargs)


def discovery(name: str = "inst", interval: float = 3.0, **kwargs: Any) -> SourceConfig:
    return SourceConfig(name=name, dsn="postgresql://fake/postgres", kind="postgres-discovery", metrics={"ping": 1},
                        discovery_interval_seconds=interval, **kwargs)


def check_no_orphan(rec: Reconciler) -> None:
    wanted = rec.wanted_sources(rec.config)
    for name, running in rec.sources.items():
        if running.parent is None:
            assert name in wanted, f"{name} runs but is not configured"
        else:
            parent = rec.parents.get(running.parent)
            assert parent is not None, f"{name} runs for {running.parent}, which is gone"
            assert name in parent.children, f"{name} is not in {running.parent}'s last list"
    for name in wanted:
        assert name in rec.sources or name in rec.parents, f"{name} is configured but not running"


def check_child_lists(rec: Reconciler) -> None:
    """What a reader sees at ANY moment, mid-request too (the status file, `reaper reload --plan`): every
    running found source runs for a live parent that lists it, and a parent lists at most one source that
    is not running (the one being started or restarted right now), never a stopped one."""
    for name, running in rec.sources.items():
        if running.parent is not None:
            parent = rec.parents.get(running.parent)
            assert parent is not None, f"{name} runs for {running.parent}, which is gone"
            assert name in parent.children, f"{name} runs, but {running.parent} does not list it"
    for name, parent in rec.parents.items():
        missing = [c for c in parent.children if (r := rec.sources.get(c)) is None or r.parent != name]
        assert len(missing) <= 1, f"{name} lists {missing}, which do not run for it"


@attrs.define(eq=False)
class EveryStep(trio.abc.Instrument):
    """Checks the child lists after every task step (every checkpoint of every task); keeps the first failure
    (an instrument that raises is only logged and removed by trio)."""

    rec: Reconciler | None = None
    steps: int = 0
    failure: str | None = None

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.rec is None or self.failure is not None:
            return
        self.steps += 1
        try:
            check_child_lists(self.rec)
        except AssertionError as e:
            self.failure = f"after a step of {task.name}: {e}"


async def settle(resolver: ScriptedResolver, rec: Reconciler) -> None:
    """Stop the resolver failing, let every pending discovery result land and every source tick."""
    resolver.failure_rate = 0.0
    await trio.sleep(12.0)  # > the longest interval + two of the longest delays: a fresh list has landed
    assert await rec.apply(rec.config) is not None  # every request sent before this one is applied
    await trio.sleep(6.0)


def run_scenario(seed: int, every_step: EveryStep | None = None) -> None:
    rng = random.Random(seed)
    harness = Harness()
    resolver = ScriptedResolver(rng, databases={f"db{i}" for i in range(rng.randint(0, 5))},
                                delays=(0.0, 0.2, 0.5, 1.0, 2.5), failure_rate=0.1)

    def random_config() -> Config:
        sources: list[SourceConfig] = []
        if rng.random() < 0.7:
            sources.append(discovery(interval=rng.choice([1.0, 3.0])))
        if rng.random() < 0.5:
            sources.append(plain("static"))
        if rng.random() < 0.2:  # a configured source with the name a discovered child would have
            sources.append(plain("inst_db1"))
        return config(*sources)

    async def main() -> None:
        rec = harness.reconciler(random_config(), resolver)
        if every_step is not None:
            every_step.rec = rec
        async with trio.open_nursery() as root, trio.open_nursery() as sources_nursery:
            await root.start(rec.run, sources_nursery)
            for _ in range(rng.randint(3, 10)):
                step = rng.random()
                if step < 0.45:
                    assert await rec.apply(random_config()) is not None
                elif step < 0.75:  # a database created or dropped on the server
                    resolver.databases ^= {f"db{rng.randint(0, 6)}"}
                await trio.sleep(rng.choice([0.0, 0.1, 0.3, 0.7, 1.5]))
                check_no_orphan(rec)
            await settle(resolver, rec)
            check_no_orphan(rec)
            if "inst" in rec.parents:  # the parent's children follow the server's databases exactly
                configured = set(rec.wanted_sources(rec.config))
                expected = {f"inst_{db}" for db in resolver.databases} - configured
                assert set(rec.parents["inst"].children) == expected
            assert max(harness.most_running.values(), default=0) <= 1, harness.most_running
            assert max(harness.connector.most.values(), default=0) <= 1, harness.connector.most
            assert harness.connector.open_names() == set(rec.sources)  # each running source: one connection
            assert await rec.submit(Shutdown())
            await rec.stopped.wait()
            assert harness.connector.open_names() == set()  # shutdown closed every connection
            assert sum(harness.running.values()) == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0),
             instruments=() if every_step is None else (every_step,))


def test_1000_random_interleavings_of_reloads_and_discovery_leave_no_orphan_and_no_double_collector() -> None:
    for seed in range(1000):
        try:
            run_scenario(seed)
        except BaseException as e:
            raise AssertionError(f"seed {seed}: {e!r}") from e


def test_a_parents_list_names_its_running_children_at_every_step_of_every_task() -> None:
    """Not only between requests: while the reconciler starts and stops children (it awaits each), a
    reader never sees a child its parent does not list, nor a stopped child still listed."""
    checked = 0
    for seed in range(300):
        every_step = EveryStep()
        run_scenario(seed, every_step)
        assert every_step.failure is None, f"seed {seed}: {every_step.failure}"
        checked += every_step.steps
    assert checked > 10_000  # the instrument ran (at every step of every scenario)


# -- the races, one at a time -----------------------------------------------------------------------

@attrs.define(eq=False)
class PatternResolver:
    """Finds the databases matching the source's include_pattern, after `delay` seconds."""

    databases: set[str]
    delay: float = 0.5

    async def __call__(self, source: SourceConfig) -> list[SourceConfig]:
        await trio.sleep(self.delay)
        return [attrs.evolve(source, name=f"{source.name}_{db}", kind="postgres", dsn=f"postgresql://fake/{db}")
                for db in sorted(self.databases) if re.match(source.include_pattern or "", db)]


class Recording(Harness):
    """Also records every collector start, and makes the source named `slow` take 3 s to stop."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[tuple[float, str]] = []

    async def run_source(self, reaper: SourceReaper, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started.append((trio.current_time(), reaper.config.name))
        try:
            await super().run_source(reaper, task_status=task_status)
        finally:
            if reaper.config.name == "slow":
                with trio.CancelScope(shield=True):
                    await trio.sleep(3)


async def test_a_list_resolved_by_a_replaced_parent_is_ignored(autojump_clock) -> None:
    harness = Recording()
    resolver = PatternResolver({"a1"})
    rec = harness.reconciler(config(discovery(interval=1.0, include_pattern="^a"), plain("slow")), resolver)
    async with trio.open_nursery() as root, trio.open_nursery() as sources_nursery:
        await root.start(rec.run, sources_nursery)
        await trio.sleep(2.2)
        assert set(rec.sources) == {"slow", "inst_a1"}
        resolver.databases |= {"a2", "b1"}
        # while the reconciler waits for `slow` to stop (3 s), the old parent sends a list with a2
        outcome = await rec.apply(config(discovery(interval=1.0, include_pattern="^b")))
        applied_at = trio.current_time()
        assert outcome is not None and outcome.removed == 1 and outcome.updated == 1
        await trio.sleep(3)
        assert set(rec.sources) == {"inst_b1"}
        assert ("inst_a2" not in {name for _, name in harness.started}), harness.started
        assert all(name == "inst_b1" for when, name in harness.started if when >= applied_at)
        await rec.submit(Shutdown())


async def test_removing_a_discovery_source_mid_refresh_stops_every_child_and_it_can_come_back(
        autojump_clock) -> None:
    harness = Harness()
    resolver = PatternResolver({f"d{i}" for i in range(5)}, delay=2.0)
    with_parent = config(discovery(interval=30.0))
    rec = harness.reconciler(with_parent, resolver)
    async with trio.open_nursery() as root, trio.open_nursery() as sources_nursery:
        await root.start(rec.run, sources_nursery)
        await trio.sleep(5)
        assert len(rec.sources) == 5 and harness.connector.open_names() == set(rec.sources)
        await rec.apply(with_parent)  # unchanged: wakes the parent, which is now mid-refresh
        await trio.sleep(1)
        assert resolver.delay and rec.parents["inst"].children  # the refresh is in flight
        outcome = await rec.apply(config())
        assert outcome == ReloadOutcome(removed=1)
        assert rec.sources == {} and rec.parents == {}
        assert harness.connector.open_names() == set()  # every child's connection closed when apply returned
        await trio.sleep(5)  # the cancelled refresh never lands
        assert rec.sources == {}
        await rec.apply(with_parent)
        await trio.sleep(5)
        assert set(rec.sources) == {f"inst_d{i}" for i in range(5)}
        assert harness.connector.open_names() == set(rec.sources)
        assert max(harness.connector.most.values()) == 1
        await rec.submit(Shutdown())


async def test_a_source_is_registered_only_once_it_has_started(autojump_clock) -> None:
    release = trio.Event()
    harness = Harness()

    async def slow_start(reaper: SourceReaper, *, task_status: trio.TaskStatus[None]) -> None:
        await release.wait()
        await supervise(reaper, task_status=task_status)

    rec = Reconciler(config(), make_source=harness.make_source, controls=harness.controls, run_source=slow_start)
    async with trio.open_nursery() as root, trio.open_nursery() as sources_nursery:
        await root.start(rec.run, sources_nursery)
        root.start_soon(rec.apply, config(plain("a")))
        await trio.sleep(1)
        assert "a" not in rec.sources  # its task exists, but has not reported started
        release.set()
        await trio.sleep(1)
        assert "a" in rec.sources
        await rec.submit(Shutdown())


async def test_a_reload_starts_stops_restarts_and_updates_in_place(autojump_clock) -> None:
    harness = Harness()
    rec = harness.reconciler(config(plain("a"), plain("b"), plain("c"), plain("e")), PatternResolver(set()))
    async with trio.open_nursery() as root, trio.open_nursery() as sources_nursery:
        await root.start(rec.run, sources_nursery)
        await trio.sleep(5)
        before = {name: running.reaper for name, running in rec.sources.items()}
        new = config(plain("b", tags={"x": "1"}), plain("c"), plain("d"),
                     attrs.evolve(plain("e"), dsn="postgresql://fake/elsewhere"))
        outcome = await rec.apply(new)
        assert outcome == ReloadOutcome(added=1, removed=1, restarted=1, updated=1, unchanged=1)
        assert set(rec.sources) == {"b", "c", "d", "e"}
        assert rec.sources["b"].reaper is before["b"] and rec.sources["b"].reaper.config.tags == {"x": "1"}
        assert rec.sources["c"].reaper is before["c"]
        assert rec.sources["e"].reaper is not before["e"]
        await trio.sleep(5)
        assert harness.connector.open_names() == {"b", "c", "d", "e"}
        assert max(harness.connector.most.values()) == 1
        await rec.submit(Shutdown())


async def test_the_pause_request_switches_every_source(autojump_clock) -> None:
    harness = Harness()
    rec = harness.reconciler(config(plain("a")), PatternResolver(set()))
    async with trio.open_nursery() as root, trio.open_nursery() as sources_nursery:
        await root.start(rec.run, sources_nursery)
        assert await rec.submit(SetPaused(True))
        await rec.apply(rec.config)  # applied in order: the pause is in effect now
        assert harness.controls.paused
        await rec.submit(Shutdown())
        await rec.stopped.wait()
        assert not await rec.submit(SetPaused(False))  # a stopped reconciler refuses requests
