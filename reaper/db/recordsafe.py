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
- A value PostgreSQL holds and Python cannot (a date before year 1 or after 9999, the time 24:00, an interval
  of millions of years; in an array, a range or a row too) fails even alone: that metric's date and time
  columns (and rows) are sent as text from then on, in the batch too (`RecordSafety.send_as_text`). A column
  asyncpg cannot read at all (a catalog table's whole row: "text encoding of composite types is not
  supported") fails its metric alone, with a hint, never the source.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from typing import Any

import asyncpg
import attrs

from reaper.db.combined import Members
from reaper.db.failures import describe_error, is_connection_error
from reaper.db.rows import RowLimit, TooManyRows, one_copy

log = logging.getLogger("reaper.db")

# pg_catalog types whose binary form asyncpg reads wrongly inside a record (measured: each value's record read
# against the same value read alone, PostgreSQL 15, asyncpg 0.30)
TEXT_ONLY = frozenset({
    "money", "tsvector", "tsquery", "macaddr", "macaddr8", "aclitem", "regclass", "regproc", "regprocedure",
    "regoper", "regoperator", "regtype", "regconfig", "regdictionary", "regnamespace", "regrole", "regcollation",
    "gtsvector", "refcursor",
})


# pg_catalog types (with their arrays) holding values that Python's datetime and timedelta cannot
TEMPORAL = frozenset({"date", "timestamp", "timestamptz", "time", "timetz", "interval", "daterange", "tsrange",
                      "tstzrange", "datemultirange", "tsmultirange", "tstzmultirange", "record"})


class Unreadable(Exception):
    """A metric's value that asyncpg cannot make a Python value of, even alone with its date and time as text."""


#: what fails one metric, not its source: the server's errors, too many rows, values or types asyncpg cannot read
READ_FAILURES: tuple[type[Exception], ...] = (asyncpg.PostgresError, TooManyRows, Unreadable,
                                              asyncpg.UnsupportedClientFeatureError)


def read_hint(exc: BaseException) -> str:
    """What to do about a value or a column type reaper cannot read (appended to the metric's error)."""
    if isinstance(exc, Unreadable | asyncpg.UnsupportedClientFeatureError):
        return "; cast the column to text in the metric's SQL"
    return ""


def _cast(type_: Any, temporal: bool = False) -> str:
    """The cast a column of this asyncpg type needs inside a record ('' for none); `temporal`: date and time
    types (and anonymous rows) too, as text."""
    name, kind, schema = type_.name, type_.kind, type_.schema
    if schema == "pg_catalog":
        base = name.removesuffix("[]") if kind == "array" else name
        if base in TEXT_ONLY or (temporal and base in TEMPORAL):
            return "::text[]" if kind == "array" else "::text"
        return ""
    return "::text" if kind == "scalar" or temporal else ""  # an extension's or a user's base type or enum


def record_safe_sql(sql: str, attributes: Sequence[Any], *, temporal: bool = False) -> str | None:
    """`sql` as the batch sends it: its columns taken BY NAME, those a record would garble cast to text, same
    names and order (`temporal`: its date and time columns too, `_cast`). A record carries no names: the batch
    reads its values by position under the names described when the metric was first seen, so a table the
    metric reads with `*` that changed since (a column dropped or added) shifted values under other names, and
    a text under a float's name crashed the source; by name, such a change can only fail the statement (the
    metric is described again). None when names repeat (positional then) and nothing needs a cast."""
    casts = [_cast(a.type, temporal) for a in attributes]
    names = [a.name for a in attributes]
    if names and len(set(names)) == len(names):
        columns = ", ".join(f"q.{_quote(n)}{cast} as {_quote(n)}" if cast else f"q.{_quote(n)}"
                            for n, cast in zip(names, casts, strict=True))
        return one_copy(_texts, f"select {columns} from ({sql.strip()}\n) as q")
    if not any(casts):
        return None
    aliases = [f"reaper_c{i}" for i in range(len(casts))]
    columns = ", ".join(f"q.{alias}{cast} as {_quote(a.name)}"
                        for alias, cast, a in zip(aliases, casts, attributes, strict=True))
    return f"select {columns} from ({sql.strip()}\n) as q({', '.join(aliases)})"


_texts: dict[str, str] = {}  # the texts sent for metrics, one copy for the whole process (rows.one_copy)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def is_decode_error(exc: BaseException) -> bool:
    """An error asyncpg raises reading a value it received (not one of the server's, nor a broken connection);
    also a value outside Python's range (ValueError, OverflowError: "year 10000 is out of range")."""
    if isinstance(exc, ValueError | OverflowError | asyncpg.ProtocolError) and not isinstance(
            exc, asyncpg.InterfaceError):  # (asyncpg's DataError is a ValueError: an argument it cannot send)
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


class RecordSafety:
    """SourceConnection's part that finds the metrics whose values asyncpg cannot read, and what is sent instead."""

    _conn: Any
    statements: int
    rewrites: dict[str, str]  # sql -> what is sent for it
    unbatched: set[str]  # sqls whose records asyncpg cannot read: sent alone
    as_text: set[str]  # sqls whose date and time columns are sent as text (`send_as_text`)
    members: Members
    server: Any  # reaper.db.tick.ServerInfo
    guard: str  # the read-only FROM item (reaper.db.READ_ONLY_GUARD)

    async def _probe_records(self, name: str, sql: str) -> None:
        """After a batch whose records asyncpg could not read: this metric's too? Then it is sent alone from now on."""
        try:
            self.statements += 1
            probe = Members.of({name: sql}, self.rewrites)
            await self._conn.fetchrow(probe.text(False, self.guard, RowLimit.value), "t")
        except Exception as e:
            if is_decode_error(e) and not self._conn.is_closed():
                self.unbatched.add(sql)
                log.warning("database %s: metric %s: its rows cannot be read inside the batch's records (%s); it "
                            "runs in a statement of its own from now on", self.server.database, name, describe_error(e))
            elif is_connection_error(e):
                raise

    async def send_as_text(self, name: str, sql: str, error: BaseException) -> str:
        """A metric whose values asyncpg cannot hold even alone (`error`): its date and time columns are sent as
        text from now on; the SQL to send. Unreadable when that cannot help (none, or done already)."""
        attributes = (await self._conn.prepare(sql)).get_attributes()
        safe = record_safe_sql(sql, attributes, temporal=True)
        if safe is None or safe == record_safe_sql(sql, attributes) or sql in self.as_text:  # (no date or time)
            raise Unreadable(f"a value reaper cannot read: {describe_error(error)}") from error
        self.rewrites[sql] = safe
        self.as_text.add(sql)
        self.members.reset()  # the batch's statement is made again with the new text
        log.warning("database %s: metric %s: a value Python cannot hold (%s); its date and time columns are sent as "
                    "text from now on", self.server.database, name, describe_error(error))
        return safe
