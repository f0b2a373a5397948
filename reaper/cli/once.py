"""`reaper once`: connect, collect every active metric one time, print the rows (or say "0 rows")."""

from __future__ import annotations

import datetime as dt
import decimal
import logging
from collections.abc import Sequence
from typing import Any

import attrs
import trio
from rich.console import Console
from rich.table import Table

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.cli.output import print_json, print_plain
from reaper.cli.progress import Progress
from reaper.config.schema import Config, SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.daemon.sourcestate import FleetControls
from reaper.errors import SourceUnavailable
from reaper.kinds import is_discovery, resolve, to_resolve, wanted
from reaper.measurement import Measurement

#: What became of one due metric of one source, when it produced no measurement.
NO_ROWS, FAILED, NOT_COLLECTED = "0 rows", "failed", "not collected"
ONCE_INTERVAL = 60  # the interval a metric given with --metric gets when the source has none for it


@attrs.define
class OnceResult:
    measurements: list[Measurement] = attrs.field(factory=list)
    empty: list[tuple[str, str, str]] = attrs.field(factory=list)  # (source, metric, NO_ROWS | FAILED | ...)
    problems: list[str] = attrs.field(factory=list)  # printed by the command
    failures: int = 0  # errors the source loop already logged


class _ProblemCollector(logging.Handler):
    """Turns the source loop's warnings and errors into the command's problem list."""

    def __init__(self, result: OnceResult) -> None:
        super().__init__(logging.ERROR)
        self.result = result

    def emit(self, record: logging.LogRecord) -> None:
        self.result.failures += 1


async def collect_once(config: Config, sources: Sequence[str] | None, metrics: Sequence[str] | None,
                       progress: Progress | None = None) -> OnceResult:
    result = OnceResult()
    catalog = Catalog.for_config(config)
    asked = set(sources or ())
    configured = {s.name for s in config.sources}
    # a name the config does not list may be one a discovery source finds (`check --connect` shows them)
    finders = [s for s in config.sources if s.enabled and is_discovery(s)] if asked - configured else []
    if asked - configured and not finders:
        result.problems += [f"unknown source {n!r}" for n in sorted(asked - configured)]
    for name in metrics or ():
        if name not in catalog.metrics:
            result.problems.append(f"unknown metric {name!r}")
    if result.problems:  # a typo: said before anything connects
        return result
    handler = _ProblemCollector(result)
    logging.getLogger("reaper.daemon.source").addHandler(handler)
    try:
        async with db.open_loop():
            found = await _concrete(to_resolve(config.sources, asked), result)
            concrete = [child for parent, child in found if wanted(parent, child, asked)]
            if asked:
                named = {c.name for c in concrete} | configured
                result.problems += [f"unknown source {n!r}" for n in sorted(asked - named)]
            controls = FleetControls()  # one connect limiter for them all, as in the daemon (a fleet's config)
            progress = progress or Progress("collected", "sources", "unreachable")
            progress.add(len(concrete))
            async with progress.shown(), trio.open_nursery() as nursery:
                for source in concrete:
                    nursery.start_soon(_collect_source, source, catalog, metrics, result, controls, progress)
    finally:
        logging.getLogger("reaper.daemon.source").removeHandler(handler)
    result.measurements.sort(key=lambda m: (m.source, m.metric))
    result.empty.sort()
    return result


async def _concrete(chosen: Sequence[SourceConfig], result: OnceResult) -> list[tuple[str, SourceConfig]]:
    """(the configured source's name, a source it stands for): a discovery kind's databases or members, as the
    daemon would find them now; a concrete source stands for itself."""
    found: list[tuple[str, SourceConfig]] = []

    async def one(source: SourceConfig) -> None:
        try:
            children = await resolve(source)
        except SourceUnavailable as e:
            result.problems.append(f"source {source.name}: cannot list its members: {e}")
            return
        if not children:
            result.problems.append(f"source {source.name}: lists no database or member")
        found.extend((source.name, child) for child in children)

    async with trio.open_nursery() as nursery:
        for source in chosen:
            nursery.start_soon(one, source)
    return sorted(found, key=lambda pair: pair[1].name)


async def _collect_source(source: Any, catalog: Catalog, metrics: Sequence[str] | None, result: OnceResult,
                          controls: FleetControls, progress: Progress) -> None:
    if metrics:  # a metric outside the source's preset is collected too: it joins the source's own table
        wanted = {m: source.metrics.get(m) or ONCE_INTERVAL for m in metrics if m in catalog.metrics}
        source = attrs.evolve(source, metrics={**source.metrics, **wanted})
    reaper = SourceReaper(source, catalog, result.measurements.append, controls=controls, max_backoff=0)  # (once)
    try:
        if not await reaper._ensure_connected():
            progress.finish(failed=True)
            return
        due = [m for m in metrics if m in catalog.metrics] if metrics else sorted(reaper.active_intervals())
        await reaper.tick(due)
        delivered = {m.metric for m in result.measurements if m.source == source.name}
        for name in due:
            if name not in delivered:
                outcome = (FAILED if name in reaper.state.degraded
                           else NO_ROWS if name in reaper.state.last_fetch else NOT_COLLECTED)
                result.empty.append((source.name, name, outcome))
        progress.finish()
    finally:
        if reaper.conn is not None:
            await reaper.conn.close()


def _cell(value: Any) -> str:
    if value is None:
        return "∅"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, decimal.Decimal | float):
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def print_result(result: OnceResult, fmt: str = "table", console: Console | None = None) -> None:
    """The rows, and a line for each due metric that gave none ("0 rows", "failed", "not collected").

    plain: `row<TAB>source<TAB>metric<TAB>column=value<TAB>...` per row, `none<TAB>source<TAB>metric<TAB>0 rows`
    per empty metric; json: an array of {"source", "metric", "rows": [...]} (rows empty, plus "outcome",
    for an empty metric)."""
    if fmt == "json":
        document: list[dict[str, Any]] = [
            {"source": m.source, "metric": m.metric, "rows": [dict(r) for r in m.rows]} for m in result.measurements]
        document += [{"source": s, "metric": n, "rows": [], "outcome": o} for s, n, o in result.empty]
        print_json(document)
        return
    if fmt == "plain":
        for m in result.measurements:
            for row in m.rows:
                print_plain("row", m.source, m.metric, *(f"{k}={'' if v is None else v}" for k, v in row.items()))
        for s, n, o in result.empty:
            print_plain("none", s, n, o)
        return
    console = console or Console()
    print_measurements(result.measurements, console)
    for s, n, o in result.empty:
        console.print(f"{s} / {n}: {o}")


def print_measurements(measurements: Sequence[Measurement], console: Console | None = None) -> None:
    """One table per measurement; a metric too wide for the terminal is shown expanded (a column of
    names and one of values per row), like psql's \\x."""
    console = console or Console()
    for m in measurements:
        columns = list(dict.fromkeys(k for row in m.rows for k in row))
        cells = [[_cell(row.get(col)) for col in columns] for row in m.rows]
        widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]
        title = f"{m.source} / {m.metric} ({len(m.rows)} rows)"
        if sum(w + 3 for w in widths) + 1 <= console.width:
            table = Table(title=title, title_justify="left")
            for col in columns:
                table.add_column(col, no_wrap=True)
            for row_cells in cells:
                table.add_row(*row_cells)
            console.print(table)
            continue
        console.print(f"[bold]{title}[/bold]")
        for n, row_cells in enumerate(cells, 1):
            table = Table(title=f"row {n}", title_justify="left", show_header=False)
            table.add_column("column", style="bold")
            table.add_column("value", overflow="fold")
            for col, value in zip(columns, row_cells, strict=True):
                table.add_row(col, value)
            console.print(table)
