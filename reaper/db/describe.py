"""Describing several metric queries in one round trip (a connection's first tick learns its metrics' columns).

One statement, prepared (parsed and described by the server, never run), holds each new query in its FROM list
with a marker column before its columns; the description is split at the markers. A source's first tick used
to describe each metric alone, one round trip each (fleet1000: 3 per source at start-up).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from reaper.db.failures import is_connection_error
from reaper.db.recordsafe import READ_FAILURES

DESCRIBE_MARK = "reaper_describe_"  # the marker column before each query's columns


def describe_text(sqls: Sequence[str]) -> str:
    """The statement that describes every query of `sqls` at once (never to be executed)."""
    parts, sources = [], []
    for i, sql in enumerate(sqls):
        parts += [f"0 as {DESCRIBE_MARK}{i}", f"q{i}.*"]
        sources.append(f"({sql.strip()}\n) as q{i}")
    return "select " + ", ".join(parts) + "\nfrom " + ",\n  ".join(sources)


def split_description(sqls: Sequence[str], attributes: Sequence[Any]) -> dict[str, Sequence[Any]] | None:
    """Each query's own attributes from the description of describe_text(sqls); None when the markers are not
    where they should be (a query's own column named like one: describe each alone then)."""
    marks = [k for k, a in enumerate(attributes) if a.name.startswith(DESCRIBE_MARK)]
    if [attributes[k].name for k in marks] != [f"{DESCRIBE_MARK}{i}" for i in range(len(sqls))]:
        return None
    out = {}
    for sql, start, end in zip(sqls, marks, [*marks[1:], len(attributes)], strict=True):
        out[sql] = attributes[start + 1:end]
    return out


async def describe_all(conn: Any, sqls: Sequence[str], retry: Collection[str] | None = None
                       ) -> tuple[dict[str, Sequence[Any]], dict[str, BaseException]]:
    """Each query's columns (sql -> attributes) and each refusal (sql -> the error: a misspelt column, a table
    or function that does not exist, a column type reaper cannot read). Prepared, never run: all of them in one
    statement, one round trip; when that fails, those of `retry` (default: all) each alone, so a refused one
    gets its own error and the others their columns. A broken connection's error propagates."""
    described: dict[str, Sequence[Any]] = {}
    if len(sqls) > 1:
        try:
            prepared = await conn.prepare(describe_text(sqls))
            described = split_description(sqls, prepared.get_attributes()) or {}
        except READ_FAILURES as e:
            if is_connection_error(e):
                raise
    refused: dict[str, BaseException] = {}
    for sql in sqls if retry is None else retry:
        if sql in described:
            continue
        try:
            described[sql] = (await conn.prepare(sql)).get_attributes()
        except READ_FAILURES as e:
            if is_connection_error(e):
                raise
            refused[sql] = e
    return described, refused


async def refused_sqls(conn: Any, sqls: Mapping[str, str],
                       why: Callable[[BaseException], str]) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> why the server, or asyncpg, refuses to prepare that metric's SQL; name -> the column names its
    query gives twice or more, see repeated_names); one round trip when none is refused. The asyncio side of
    SourceConnection.refusals (`reaper check --connect`)."""
    described, refused = await describe_all(conn, list(dict.fromkeys(sqls.values())))
    repeats = {name: names for name, sql in sqls.items()
               if sql in described and (names := repeated_names([a.name for a in described[sql]]))}
    return {name: why(refused[sql]) for name, sql in sqls.items() if sql in refused}, repeats


def repeated_names(columns: Sequence[str]) -> str:
    """The names a query gives to more than one of its columns, quoted and comma-separated ('' when none)."""
    return ", ".join(repr(n) for n in sorted({n for n in columns if columns.count(n) > 1}))
