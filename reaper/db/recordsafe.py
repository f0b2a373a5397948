"""Metric columns that asyncpg cannot read inside a record, and what the batch does about them.

The combined statement (reaper.db.combined) brings each metric's rows as an array of records, which the server
sends in binary, each value with its own type. asyncpg reads a value of a type it only knows in text form
(money, tsvector, macaddr, the reg* types, an extension's type such as hstore or ltree) from those binary bytes
as if they were text: garbage, or an error that used to look like a broken connection and took the whole
source down. Alone, the same metric is read fine (asyncpg asks for text there). So:

- `record_safe_sql`: a member whose description shows such a column is sent with that column cast to text (its
  arrays to text[]): the value asyncpg gives for it alone, a string, and the metric stays in the batch.
- A value that still cannot be read (a domain's value: the description names the base type, the record the
  domain) fails the statement with `is_decode_error`; the connection is fine, so the tick runs each metric
  alone instead (nothing is lost), and the metrics whose records cannot be read are found and sent alone from
  then on (reaper.db.SourceConnection).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

import asyncpg
import attrs

# pg_catalog types whose binary form asyncpg reads wrongly inside a record (measured: each value's record read
# against the same value read alone, PostgreSQL 15, asyncpg 0.30)
TEXT_ONLY = frozenset({
    "money", "tsvector", "tsquery", "macaddr", "macaddr8", "aclitem", "regclass", "regproc", "regprocedure",
    "regoper", "regoperator", "regtype", "regconfig", "regdictionary", "regnamespace", "regrole", "regcollation",
    "gtsvector", "refcursor",
})


def _cast(type_: Any) -> str:
    """The cast a column of this asyncpg type needs inside a record ('' for none)."""
    name, kind, schema = type_.name, type_.kind, type_.schema
    if schema == "pg_catalog":
        if name in TEXT_ONLY:
            return "::text"
        if kind == "array" and name.removesuffix("[]") in TEXT_ONLY:
            return "::text[]"
        return ""
    return "::text" if kind == "scalar" else ""  # an extension's or a user's base type or enum


def record_safe_sql(sql: str, attributes: Sequence[Any]) -> str | None:
    """`sql` with its columns that a record would garble cast to text, same column names and order; None when
    every column reads fine."""
    casts = [_cast(a.type) for a in attributes]
    if not any(casts):
        return None
    aliases = [f"reaper_c{i}" for i in range(len(casts))]
    columns = ", ".join(f"q.{alias}{cast} as {_quote(a.name)}"
                        for alias, cast, a in zip(aliases, casts, attributes, strict=True))
    return f"select {columns} from ({sql.strip()}) as q({', '.join(aliases)})"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def is_decode_error(exc: BaseException) -> bool:
    """An error asyncpg raises reading a value it received (not one of the server's, nor a broken connection)."""
    if isinstance(exc, UnicodeDecodeError | asyncpg.ProtocolError):
        return True
    text = str(exc)
    if isinstance(exc, asyncpg.InternalClientError):
        return "decoder" in text or "decode" in text
    return isinstance(exc, asyncpg.ProtocolViolationError) and "insufficient data" in text


@attrs.frozen
class Batchable:
    """The metrics a source's batch statement may hold: described, and not among those sent alone."""

    described: Container[str]
    unbatched: Container[str]

    def __contains__(self, sql: object) -> bool:
        return sql in self.described and sql not in self.unbatched
