"""Sources from a pgwatch config database (`[[sources_from]]`): the refresh task and the merge.

Each `[[sources_from]]` table is a *feed*. Its task (started and stopped by the reconciler, like a
discovery source's) reads `pgwatch.source` (reaper.db.configdb, read-only) now, then every
`refresh_seconds` and when woken (a reload, SIGHUP), converts the rows exactly as `reaper
import-pgwatch sources --from-db` would (reaper.catalog.pgwatch.sources) and sends the list to the
reconciler as a `FeedListed` request. It changes nothing itself: the reconciler merges every feed's
list with the file's `[[sources]]` and applies the result like a reload (start what is new, stop
what is gone, restart what changed its connection, update in place what changed otherwise), so an
unchanged source misses no tick.

- A read that fails keeps the last list and is logged once (and once when it works again).
- A row reaper cannot collect (an unknown kind, an unknown preset, a bad connstr ...) is reported
  once, one line each, and left out; every other row still counts.
- A name already used by a `[[sources]]` table (or by an earlier feed) stays with that one; the
  clash is logged once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs
import trio

from reaper.catalog.metrics import Catalog
from reaper.config.load import expand_table
from reaper.config.schema import Config, SourceConfig, SourcesFromConfig, _format_cattrs_errors, converter
from reaper.errors import SourceUnavailable
from reaper.kinds import check_source

log = logging.getLogger("reaper.daemon.sources_from")

READ_GRACE_SECONDS = 5.0
# the importer's advice about the shipped catalogue: here each row is checked against the running one
IMPORT_ONLY_NOTES = ("not shipped with reaper", "is not a preset reaper ships")
FeedReader = Callable[["RunningFeed", Catalog], Awaitable[list[SourceConfig]]]


@attrs.frozen
class FeedListed:
    """A request to the reconciler: the sources a feed lists now."""

    dsn: str
    generation: int
    found: tuple[SourceConfig, ...]


@attrs.define(eq=False)
class RunningFeed:
    config: SourcesFromConfig
    generation: int  # a list sent by an older generation of this feed is stale
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    wake: trio.Event = attrs.field(factory=trio.Event)
    sources: tuple[SourceConfig, ...] = ()  # the last list (written by the reconciler only)
    error: str | None = None  # why the last read failed (written by its own task)
    reported: set[str] = attrs.field(factory=set)  # row problems already logged
    clashes: set[str] = attrs.field(factory=set)  # names left to another source (logged once)
    reads: int = 0

    def __repr__(self) -> str:
        state = f" failing: {self.error}" if self.error else ""
        return f"<Feed {self.config.label} sources={len(self.sources)}{state}>"


def merged_sources(file_sources: Iterable[SourceConfig], feeds: Iterable[RunningFeed]) -> list[SourceConfig]:
    """The file's sources, then each feed's (in config order) whose name is not taken yet."""
    merged = list(file_sources)
    taken = {s.name for s in merged}
    for feed in feeds:
        for source in feed.sources:
            if source.name in taken:
                if source.name not in feed.clashes:
                    feed.clashes.add(source.name)
                    log.error("%s: source %s: the name is taken by another source (a [[sources]] table or an "
                              "earlier [[sources_from]]); this row is not collected", feed.config.label, source.name)
                continue
            taken.add(source.name)
            merged.append(source)
    return merged


def _report(feed: RunningFeed, line: str, level: int = logging.WARNING) -> None:
    if line not in feed.reported:
        feed.reported.add(line)
        log.log(level, "%s", line.replace("written commented out", "not collected"))


def sources_from_rows(feed: RunningFeed, rows: list[dict[str, Any]], catalog: Catalog,
                      environ: Mapping[str, str] | None = None) -> list[SourceConfig]:
    """The sources reaper collects from these pgwatch.source rows; every problem logged once."""
    from reaper.catalog.pgwatch.sources import convert_source_rows  # only a config with [[sources_from]]

    env = os.environ if environ is None else environ
    label = feed.config.label
    results, report = convert_source_rows(rows, label)
    for line in report.lines:
        if not any(hint in line for hint in IMPORT_ONLY_NOTES):
            _report(feed, line)
    found: list[SourceConfig] = []
    for table, ok in results:
        name = table["name"]
        where = f"{label}: source {name}"
        if not ok:
            _report(feed, f"{where}: not collected (see the lines above)", logging.ERROR)
            continue
        expanded, problems = expand_table(table, "", env)
        try:
            source = converter.structure(expanded, SourceConfig) if not problems else None
        except Exception as e:
            problems = _format_cattrs_errors(e)
            source = None
        if source is not None:
            problems = check_source(source)
            for key, preset in (("preset_config", source.preset), ("preset_config_standby", source.standby_preset)):
                if preset is not None and preset not in catalog.presets:
                    problems.append(f"{key}: unknown preset {preset!r}")
            problems += [f"metric {m}: unknown" for m in (*source.metrics, *source.standby_metrics)
                         if m not in catalog.metrics]
        for problem in problems:
            _report(feed, f"{where}: {problem.lstrip('.')}; not collected", logging.ERROR)
        if source is not None and not problems:
            found.append(source)
    return found


async def read_feed(feed: RunningFeed, catalog: Catalog) -> list[SourceConfig]:
    """Read the feed's config database now. Raises SourceUnavailable (the caller keeps its list)."""
    from reaper.db.configdb import read_source_rows  # only a config with [[sources_from]]

    config = feed.config
    deadline = config.connect_timeout_seconds + config.query_timeout_seconds + READ_GRACE_SECONDS
    try:
        with trio.fail_after(deadline):
            rows = await read_source_rows(config.dsn, password_file=config.password_file,
                                          statement_timeout_seconds=config.query_timeout_seconds)
    except trio.TooSlowError:
        raise SourceUnavailable(f"reading pgwatch.source timed out after {deadline:g}s") from None
    return sources_from_rows(feed, rows, catalog)


async def run_feed(feed: RunningFeed, send: trio.MemorySendChannel[Any], catalog: Callable[[], Catalog],
                   reader: FeedReader = read_feed, *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Read the feed now, then every refresh_seconds or when woken; send each list to the reconciler."""
    label = feed.config.label
    try:
        with send, feed.scope:
            task_status.started()
            while True:
                try:
                    found = await reader(feed, catalog())
                except SourceUnavailable as e:
                    if feed.error is None:
                        log.error("%s: cannot read the sources: %s; keeping the last known %d sources", label, e,
                                  len(feed.sources))
                    feed.error = str(e)
                else:
                    if feed.error is not None:
                        log.warning("%s: sources read again (%d)", label, len(found))
                    elif feed.reads == 0:
                        log.info("%s: %d sources", label, len(found))
                    feed.error = None
                    feed.reads += 1
                    await send.send(FeedListed(feed.config.dsn, feed.generation, tuple(found)))
                with trio.move_on_after(feed.config.refresh_seconds):
                    await feed.wake.wait()
                feed.wake = trio.Event()
    finally:
        feed.done.set()


class Feeds:
    """The running feeds, kept by the reconciler (only it calls these): started, replaced and stopped
    as `[[sources_from]]` changes; `merged` is the config the reconciler applies (the file's sources and
    every feed's)."""

    def __init__(self, config: Config) -> None:
        self.running: dict[str, RunningFeed] = {}
        self.file_config = config
        self._generation = 0
        self._nursery: trio.Nursery | None = None
        self._send: trio.MemorySendChannel[Any] | None = None
        self._catalog: Callable[[], Catalog] = Catalog.for_config

    def __repr__(self) -> str:
        return f"<Feeds {list(self.running.values())}>"

    async def start(self, nursery: trio.Nursery, send: trio.MemorySendChannel[Any],
                    catalog: Callable[[], Catalog]) -> None:
        """Start the file config's feeds as tasks in `nursery`, each sending on a clone of `send`."""
        self._nursery, self._send, self._catalog = nursery, send, catalog
        await self.sync(self.file_config)

    def merged(self, config: Config | None = None) -> Config:
        config = self.file_config if config is None else config
        if not self.running:
            return config
        return attrs.evolve(config, sources=tuple(merged_sources(config.sources, self.running.values())))

    async def sync(self, new: Config) -> Config:
        """A reload: start new feeds, stop removed ones, replace changed ones (keeping their last list),
        and wake the others (a reload re-reads every config database). Returns the merged config."""
        wanted = {f.dsn: f for f in new.sources_from}
        for dsn in [d for d in self.running if d not in wanted]:
            await self._stop(self.running.pop(dsn))
        for dsn, config in wanted.items():
            feed = self.running.get(dsn)
            if feed is None:
                await self._start(config, ())
            elif feed.config != config:
                await self._stop(self.running.pop(dsn))
                await self._start(config, feed.sources)
            else:
                feed.wake.set()
        self.running = {d: self.running[d] for d in wanted}  # config order: the first feed keeps a name
        self.file_config = new
        return self.merged()

    def accept(self, request: FeedListed) -> str | None:
        """Store a feed's new list. When it changed (the merged config must then be applied): the
        feed's label (no password in it); else None."""
        feed = self.running.get(request.dsn)
        if feed is None or feed.generation != request.generation:
            log.debug("a stale list (generation %d) ignored", request.generation)
            return None
        if feed.sources == request.found:
            return None
        feed.sources = request.found
        return feed.config.label

    async def stop_all(self) -> None:
        for feed in self.running.values():
            feed.scope.cancel()
        for feed in self.running.values():
            await feed.done.wait()

    async def _start(self, config: SourcesFromConfig, sources: tuple[SourceConfig, ...]) -> None:
        assert self._nursery is not None and self._send is not None, "start() first"
        self._generation += 1
        feed = RunningFeed(config, self._generation, sources=sources)
        await self._nursery.start(run_feed, feed, self._send.clone(), self._catalog)
        self.running[config.dsn] = feed

    @staticmethod
    async def _stop(feed: RunningFeed) -> None:
        feed.scope.cancel()
        await feed.done.wait()
