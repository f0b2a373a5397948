"""The tick's one statement: every batched metric of a source in one SELECT, each run only when due.

A source's connection keeps ONE combined statement for all the metrics it batches (its members), and each
tick sends it with a text parameter that says which are due, one letter a member (`t` or `f`): `case when
substr($1::text, k, 1) = 't' then (<metric k>) end` (text, not bool[]: asyncpg has no codec of its own for
bool[] and would read its type from the server's catalog on every new connection). PostgreSQL runs a scalar
subquery (an InitPlan) lazily, when the expression that needs it is evaluated, so a metric that is not due
costs nothing on the server. Before this, each distinct set of due metrics was a statement of its own:
asyncpg kept each one prepared on every connection (its row description and codecs, 3-5 KB each: 2 a source
for `basic`, up to 11 for `exhaustive`) and the server kept a plan for each in every backend. Now one text,
one plan per backend (the connection asks for `plan_cache_mode = force_generic_plan`: with custom plans the
server would plan the due metrics again at every tick, since the generic plan's estimate counts every
member).

Per-metric server time inside the one statement: the target list is evaluated in order, so a clock column
after each due metric's column, with the first clock or the previous due metric's before it, brackets exactly
that metric's execution (tests/test_cost_pg.py measures it with pg_sleep metrics). Column k of the record: 0 in
recovery, 1 the first clock, then per member i its rows at 2 + 2i and the clock after it at 3 + 2i (null when
it is not due: a member that is not due costs nothing on the client either), then `active_backends` when asked
for and `extmark` (reaper.db.facts.EXTENSIONS_MARK), read by name. A clock is the epoch as float8
(CLOCK): a timestamptz became a datetime object per member and tick, and a subtraction (a source of the
`exhaustive` preset has ~30 members, ~7 of them due in a tick); float8 keeps a fifth of a microsecond.
"""

from __future__ import annotations

import functools
from collections.abc import Container, Iterable, Mapping

from reaper.db.facts import EXTENSIONS_MARK

#: the statement's clock: seconds since the epoch as float8 (date_part is float8; extract is numeric from 14 on)
CLOCK = "date_part('epoch', clock_timestamp())"
#: a column of the batch's statement when the source's cost budget pauses heavy metrics on a busy server
ACTIVE_BACKENDS_SQL = ("(select count(*) from pg_stat_activity where state = 'active'"
                       " and backend_type = 'client backend' and pid <> pg_backend_pid())::int")


@functools.lru_cache(maxsize=256)  # a few per preset and server version: tens of KB each
def combined_text(sqls: tuple[str, ...], count_active: bool, guard: str, max_rows: int) -> str:
    """One text per distinct set of members, built once and shared by every source that sends it: each
    connection's statement cache keeps the text it prepared, and a fleet's sources send the same few
    texts (each tens of KB for a big preset). `$1` (one letter a member, `t` or `f`) says which run.
    Each member yields at most max_rows + 1 rows (one more than the limit: reaper.db.rows.RowLimit)."""
    parts = ["pg_is_in_recovery()", f"{CLOCK} as c0"]
    for i, sql in enumerate(sqls):
        # t.* is the subquery's whole row even when the metric has a column named t (array_agg(t) would be that column)
        run = f"(select array_agg(t.*) from (select * from ({sql.strip()}\n) q limit {max_rows + 1}) t)"
        due = f"substr($1::text, {i + 1}, 1) = 't'"
        parts += [f"case when {due} then {run} end as m{i}", f"case when {due} then {CLOCK} end as c{i + 1}"]
    if count_active:
        parts.append(f"{ACTIVE_BACKENDS_SQL} as active_backends")
    parts.append(f"{EXTENSIONS_MARK} as extmark")  # (a change: the connection reads its extensions again)
    return "select " + ",\n  ".join(parts) + f"\nfrom {guard}"


class Members:
    """The batch statement's members on one connection: what it had, the source's batched metrics and the due
    ones, each with its current SQL once described (`update`). Grows rarely (a special's reads riding the first
    time): each growth is a new statement text; `reset` (after a failed statement) starts the set again. The
    sorted names, each one's position and the text are made again only after a change, not at every tick."""

    __slots__ = ("_absorbed", "_index", "_listed", "_rewrites", "_sqls", "_texts", "sqls")

    def __init__(self, rewrites: Mapping[str, str] | None = None) -> None:
        self.sqls: dict[str, str] = {}  # name -> sql
        self._rewrites = {} if rewrites is None else rewrites  # sql -> what is sent for it (recordsafe.py)
        self._listed: tuple[str, ...] | None = None  # sorted names (None: to be made again)
        self._sqls: tuple[str, ...] = ()
        self._index: dict[str, int] = {}
        self._texts: dict[tuple[bool, str, int], str] = {}
        self._absorbed: Mapping[str, str] | None = None  # the universe whose every member is in, described

    @classmethod
    def of(cls, sqls: Mapping[str, str], rewrites: Mapping[str, str] | None = None) -> Members:
        """Just these (a timed group's statement: every member due)."""
        members = cls(rewrites)
        members.sqls = dict(sqls)
        return members

    def update(self, universe: Mapping[str, str], due: Iterable[tuple[str, str]], described: Container[str]) -> None:
        """Add the source's batched metrics (`universe`) once described, and the due (name, sql) pairs."""
        sqls = self.sqls
        if universe is not self._absorbed:  # (the source hands the same object until its members change)
            complete = True
            for name, sql in universe.items():
                if sqls.get(name) != sql:
                    if sql in described:
                        sqls[name], self._listed = sql, None
                    else:
                        complete = False
            self._absorbed = universe if complete else None
        for name, sql in due:
            if sqls.get(name) != sql:
                sqls[name], self._listed = sql, None

    def reset(self) -> None:
        self.sqls, self._listed, self._absorbed = {}, None, None

    @property
    def listed(self) -> tuple[str, ...]:
        """The members in the statement's order (by name)."""
        if self._listed is None:
            self._listed = tuple(sorted(self.sqls))
            rewrites = self._rewrites
            self._sqls = tuple(rewrites.get(sql, sql) for sql in (self.sqls[n] for n in self._listed))
            self._index = {n: i for i, n in enumerate(self._listed)}
            self._texts = {}
        return self._listed

    def text(self, count_active: bool, guard: str, max_rows: int) -> str:
        self.listed  # noqa: B018  (fills _sqls and _texts when the members changed)
        key = (count_active, guard, max_rows)
        text = self._texts.get(key)
        if text is None:
            text = self._texts[key] = combined_text(self._sqls, count_active, guard, max_rows)
        return text

    def flags(self, due: Iterable[str]) -> str:
        """$1: `t` for each due member, `f` for the others, in the statement's order."""
        flags = bytearray(b"f" * len(self.listed))
        index = self._index
        for name in due:
            flags[index[name]] = 0x74  # t
        return flags.decode()
