"""`reaper check --connect`: before the first tick, what each source's role will be able to collect.

Every enabled source (discovery kinds resolved into their concrete sources first) is connected to
with bounded concurrency and a per-source deadline (connect + query timeout); its server version,
recovery state, role and memberships are read, then the catalog is asked about every function,
relation, setting and extension the source's active metrics need (reaper.db.privileges), and each
metric gets a verdict with the exact fixing statement (reaper.preflight.judge). Nothing is collected
and nothing is changed; every statement runs read-only, like every other one reaper sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import attrs
import trio

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.catalog.requirements import metric_needs, names_to_check
from reaper.config.schema import Config, SourceConfig
from reaper.config.sinks import PostgresSinkConfig
from reaper.db.privileges import Privileges, read_privileges
from reaper.errors import SourceUnavailable
from reaper.kinds import POOLER_KINDS, is_discovery, resolve, to_resolve, wanted
from reaper.preflight.judge import FAILS, PARTIAL, SKIP, Server, Verdict, judge

if TYPE_CHECKING:
    from reaper.cli.progress import Progress
    from reaper.db.storage_check import StorageCheck

CONCURRENCY = 8


@attrs.define
class SourceReport:
    name: str
    kind: str = "postgres"
    reachable: bool = False
    error: str = ""
    version: str = ""
    major: int = 0
    in_recovery: bool | None = None
    database: str = ""
    address: str = ""
    pooler: bool = False  # reached through a connection pooler (reaper.db.pooler)
    search_path: str | None = None  # the one reaper pinned (reaper.db.facts); None: the server's
    absent_schemas: tuple[str, ...] = ()  # the source's search_path schemas this database lacks (a typo?)
    role: str = ""
    superuser: bool = False
    memberships: tuple[str, ...] = ()
    includes: dict[str, tuple[str, ...]] = attrs.field(factory=dict)  # predefined role -> roles it includes
    verdicts: list[Verdict] = attrs.field(factory=list)
    host: str = ""  # for the SQL script's \connect
    port: int = 0


async def check_connect(config: Config, only: Sequence[str] | None = None,
                        progress: Progress | None = None) -> list[SourceReport]:
    """A report per concrete source, in name order (`progress`: told of each one as it is checked)."""
    catalog = Catalog.for_config(config)
    asked = set(only or ())
    chosen = to_resolve(config.sources, asked)  # (a name the config lacks may be a database one finds)
    reports: list[SourceReport] = []
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one(source: SourceConfig) -> None:
        async with limiter:
            reports.append(await check_source(source, catalog))
        if progress is not None:
            progress.finish(failed=not reports[-1].reachable)

    async def expand(source: SourceConfig) -> None:
        try:
            async with limiter:
                children = await resolve(source)
        except SourceUnavailable as e:
            reports.append(SourceReport(source.name, kind=source.kind, error=f"cannot list its members: {e}"))
            return
        if not children:
            reports.append(SourceReport(source.name, kind=source.kind, error="lists no database or member"))
        mine = [child for child in children if wanted(source.name, child, asked)]
        if progress is not None:
            progress.add(len(mine))
        async with trio.open_nursery() as inner:
            for child in mine:
                inner.start_soon(one, child)

    if progress is not None:
        progress.add(sum(not is_discovery(s) for s in chosen))
    async with db.open_loop(), progress.shown() if progress else nullcontext(), trio.open_nursery() as nursery:
        for source in chosen:
            nursery.start_soon(expand if is_discovery(source) else one, source)
    return sorted(reports, key=lambda r: r.name)


async def check_storages(config: Config) -> list[StorageCheck]:
    """A check per `postgres` sink (reaper.db.storage_check), in label order."""
    from reaper.db.storage_check import check_storage

    checks: list[StorageCheck] = []

    async def one(sink: PostgresSinkConfig) -> None:
        checks.append(await check_storage(sink))

    async with db.open_loop(), trio.open_nursery() as nursery:
        for sink in config.sinks:
            if isinstance(sink, PostgresSinkConfig):
                nursery.start_soon(one, sink)
    return sorted(checks, key=lambda c: c.label)


async def check_source(source: SourceConfig, catalog: Catalog) -> SourceReport:
    report = SourceReport(source.name, kind=source.kind)
    report.host, report.port = _host_port(source.dsn)
    deadline = source.connect_timeout_seconds + source.query_timeout_seconds
    try:
        with trio.fail_after(deadline):
            if source.kind in POOLER_KINDS:
                await _check_pooler(source, report)
            else:
                await _check_postgres(source, catalog, report)
    except SourceUnavailable as e:
        report.reachable, report.error = False, str(e)
    except trio.TooSlowError:
        report.reachable, report.error = False, f"no answer within {deadline:g}s (connect + query timeout)"
    return report


async def _check_pooler(source: SourceConfig, report: SourceReport) -> None:
    from reaper.db.simple import open_simple_connection

    conn = await open_simple_connection(source.dsn, kind=source.kind,  # type: ignore[arg-type]
                                        statement_timeout_seconds=source.query_timeout_seconds,
                                        password_file=source.password_file)
    try:
        report.reachable, report.version = True, conn.product
    finally:
        await conn.close()


async def _check_postgres(source: SourceConfig, catalog: Catalog, report: SourceReport) -> None:
    conn = await db.open_source_connection(source.dsn, statement_timeout_seconds=source.query_timeout_seconds,
                                           password_file=source.password_file,
                                           lock_timeout_seconds=source.lock_timeout_seconds,
                                           search_path=source.search_path)
    try:
        server = conn.server
        report.reachable = True
        report.version, report.major, report.in_recovery = server.version, server.major, server.in_recovery
        report.database, report.address, report.pooler = server.database, server.address, conn.pooled
        report.search_path = server.search_path
        if server.search_path is not None:
            rows = await conn.fetch("select s from unnest($1::text[]) as s"
                                    " where to_regnamespace(quote_ident(s)) is null", list(source.search_path))
            report.absent_schemas = tuple(r["s"] for r in rows)
        intervals = catalog.intervals(source, standby=server.in_recovery)
        needs = {name: metric_needs(catalog.metrics[name], server.major, catalog.metrics) for name in intervals}
        functions, relations, settings, extensions = names_to_check(needs.values())
        priv: Privileges = await read_privileges(conn, functions=functions, relations=relations,
                                                 settings=settings, extensions=extensions)
        where = Server(major=server.major, database=server.database, is_local=server.is_local,
                       command_prefix=source.specials.command_prefix)
        verdicts = [judge(name, needs[name], priv, where) for name in sorted(needs)]
        # what would run: its SQL prepared (never run), so that a misspelt column is not "will collect"
        refused, repeats = await conn.refusals({v.metric: sql for v in verdicts if v.status != SKIP
                                                and (sql := catalog.metrics[v.metric].sql_for(server.major))})
    finally:
        await conn.close()
    report.role, report.superuser, report.memberships = priv.role, priv.superuser, priv.memberships
    report.includes = priv.includes
    report.verdicts = [Verdict(v.metric, FAILS, (f"its SQL fails here: {refused[v.metric]}",)) if v.metric in refused
                       else _repeating(v, repeats[v.metric]) if v.metric in repeats else v for v in verdicts]


def _repeating(verdict: Verdict, names: str) -> Verdict:
    """A metric whose query names columns alike collects partly: a row keeps the last value of each name."""
    reason = f"its query names more than one column {names}: only the last of each is kept (name each its own)"
    return Verdict(verdict.metric, PARTIAL, (*verdict.reasons, reason), verdict.fixes)


def _host_port(dsn: str) -> tuple[str, int]:
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(dsn)
        return unquote(parts.hostname or ""), parts.port or 5432
    except ValueError:
        return "", 5432
