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

Per-metric server time inside the one statement: the target list is evaluated in order, so a
clock_timestamp() column before and after each metric's column brackets exactly that metric's execution
(tests/test_cost_pg.py measures it with pg_sleep metrics). Column k of the record: 0 in recovery, 1 the
first clock, then per member i its rows at 2 + 2i and the clock after it at 3 + 2i.
"""

from __future__ import annotations

import functools

#: a column of the batch's statement when the source's cost budget pauses heavy metrics on a busy server
ACTIVE_BACKENDS_SQL = ("(select count(*) from pg_stat_activity where state = 'active'"
                       " and backend_type = 'client backend' and pid <> pg_backend_pid())::int")


@functools.lru_cache(maxsize=256)  # a few per preset and server version: tens of KB each
def combined_text(sqls: tuple[str, ...], count_active: bool, guard: str) -> str:
    """One text per distinct set of members, built once and shared by every source that sends it: each
    connection's statement cache keeps the text it prepared, and a fleet's sources send the same few
    texts (each tens of KB for a big preset). `$1` (one letter a member, `t` or `f`) says which run."""
    parts = ["pg_is_in_recovery()", "clock_timestamp() as c0"]
    for i, sql in enumerate(sqls):
        # t.* is the subquery's whole row even when the metric has a column named t (array_agg(t) would be that column)
        run = f"(select array_agg(t.*) from ({sql.strip()}) t)"
        parts += [f"case when substr($1::text, {i + 1}, 1) = 't' then {run} end as m{i}",
                  f"clock_timestamp() as c{i + 1}"]
    if count_active:
        parts.append(f"{ACTIVE_BACKENDS_SQL} as active_backends")
    return "select " + ",\n  ".join(parts) + f"\nfrom {guard}"
