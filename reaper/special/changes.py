"""change_events: DDL, configuration and privilege change detection by comparing hashes between runs.

Each run sends the five shipped hash metrics (sproc_hashes, table_hashes, index_hashes,
configuration_hashes, privilege_changes) to the server in ONE combined statement (or finds them done in
the fast lane's statement of its tick, reaper.daemon.rides, while they are cheap) and compares their
rows with the previous run's, kept in `ctx.state` (so a SIGHUP that leaves the source alone keeps the
baseline). The first successful run of a category is its baseline and reports nothing. Later runs
write, like pgwatch:

- `sproc_changes`, `table_changes`, `index_changes`: the hash row plus `event` create/alter, or a
  drop row (`epoch_ns`, the object's tag columns, `event` = drop);
- `configuration_changes`: `tag_setting`, `value`, `event` create/alter (a setting never "drops");
- `privilege_changes`: `object_type`, `tag_role`, `tag_object`, `privilege_type`, `event` GRANT/REVOKE;
- `change_events`: one summary row `details` = "functions: c/a/d tables: c/a/d indexes: c/a/d
  settings: c/a/d privileges: c/a/d" (created/altered/dropped), only when something changed.

A category whose query fails keeps its previous state and is skipped for this run (warned once per
message); when all five fail the run fails with their errors.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from reaper import db
from reaper.catalog.metrics import load_shipped_definitions
from reaper.errors import MetricError
from reaper.special import Result, Rows, SpecialContext

log = logging.getLogger("reaper.special.changes")

NAME = "change_events"
# A category of up to this many objects is compared inline (a few ms at most: a thread hop would cost
# more); a bigger one in a worker thread, so other sources' ticks stay on time.
INLINE_COMPARE_ROWS = 20_000
Key = tuple[str, ...]


def _text(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value)


@attrs.frozen
class Category:
    """One kind of object: which hash metric feeds it, where its changes go, how rows are compared."""

    hashes: str  # the shipped hash metric
    table: str  # where its change rows are written
    label: str  # its name in the summary
    key_columns: tuple[str, ...]  # identify an object; also the columns of a drop/revoke row
    value: Callable[[Mapping[str, Any]], str]  # what is compared between runs
    events: tuple[str, str, str]  # create, alter, drop
    compared: tuple[str, ...]  # the columns `value` reads
    report_drops: bool = True

    def key(self, row: Mapping[str, Any]) -> Key:
        return tuple(_text(row, c) for c in self.key_columns)


CATEGORIES: tuple[Category, ...] = (
    Category("sproc_hashes", "sproc_changes", "functions", ("tag_sproc", "tag_oid"),
             lambda r: _text(r, "md5"), ("create", "alter", "drop"), ("md5",)),
    Category("table_hashes", "table_changes", "tables", ("tag_table",),
             lambda r: _text(r, "md5"), ("create", "alter", "drop"), ("md5",)),
    Category("index_hashes", "index_changes", "indexes", ("tag_index",),
             lambda r: _text(r, "md5") + _text(r, "is_valid"), ("create", "alter", "drop"), ("md5", "is_valid")),
    # pgwatch never reports a vanished setting (one that an unloaded library defined): neither do we
    Category("configuration_hashes", "configuration_changes", "settings", ("tag_setting",),
             lambda r: _text(r, "value"), ("create", "alter", "drop"), ("value",), report_drops=False),
    # a privilege is there or not: its "value" never changes, so there is no alter
    Category("privilege_changes", "privilege_changes", "privileges",
             ("object_type", "tag_role", "tag_object", "privilege_type"),
             lambda r: "", ("GRANT", "GRANT", "REVOKE"), ()),
)


@attrs.define
class Counts:
    created: int = 0
    altered: int = 0
    dropped: int = 0

    @property
    def total(self) -> int:
        return self.created + self.altered + self.dropped


def signature(category: Category, rows: Rows) -> int | None:
    """A digest of what compare() reads of the rows, in their order, gathered at C speed: the same
    signature as the last run's means nothing changed (most runs), so the per-row comparison is skipped.
    A digest (Python's hash of the tuple), not the values themselves: those are in the state already, and a
    second copy of every object's key and hash doubled what a source of a big database keeps. None when a
    row lacks a column (compare() says what that means) or holds a value that cannot be hashed."""
    getter = operator.itemgetter(*category.key_columns, *category.compared)
    try:
        return hash(tuple(map(getter, rows)))
    except (KeyError, TypeError):  # TypeError: a value that cannot be hashed (a list): compared row by row
        return None


def compare(category: Category, previous: dict[Key, str] | None, rows: Rows,
            wall_ns: int) -> tuple[dict[Key, str], Rows, Counts]:
    """The new state, the change rows and their counts. `previous` None = baseline (no changes)."""
    keyed = [(category.key(row), row) for row in rows]
    current: dict[Key, str] = {key: category.value(row) for key, row in keyed}
    counts = Counts()
    if previous is None:
        return current, [], counts
    create, alter, drop = category.events
    changes: Rows = []
    seen: set[Key] = set()
    for key, row in keyed:
        if key in seen:  # the same privilege from two grantors, say
            continue
        seen.add(key)
        before = previous.get(key)
        if before is None:
            changes.append({**row, "event": create})
            counts.created += 1
        elif before != current[key]:
            changes.append({**row, "event": alter})
            counts.altered += 1
    gone = [key for key in previous if key not in current]
    if gone and category.report_drops:
        epoch = rows[0].get("epoch_ns") if rows else None
        epoch_ns = epoch if isinstance(epoch, int) else wall_ns
        for key in sorted(gone):
            changes.append({"epoch_ns": epoch_ns, **dict(zip(category.key_columns, key, strict=True)),
                            "event": drop})
            counts.dropped += 1
    elif gone:  # not reported: remembered, so that its return is no "create"
        current.update((key, previous[key]) for key in gone)
    return current, changes, counts


def summary(counts: Mapping[str, Counts]) -> str:
    return " ".join(f"{c.label}: {counts[c.label].created}/{counts[c.label].altered}/{counts[c.label].dropped}"
                    for c in CATEGORIES)


def reads(server: db.ServerInfo) -> dict[str, str]:
    """A run's server reads (the registry's `reads`): they may ride in the fast lane's statement."""
    return hash_queries(server.major)


def hash_queries(major: int) -> dict[str, str]:
    """The SQL of the five hash metrics for this server version (those that have one)."""
    defs = load_shipped_definitions().metrics
    batch: dict[str, str] = {}
    for category in CATEGORIES:
        metric = defs.get(category.hashes)
        sql = metric.sql_for(major) if metric is not None else None
        if sql is not None:
            batch[category.hashes] = sql
    return batch


async def change_events(ctx: SpecialContext) -> Result:
    state = ctx.state
    identity = (ctx.server.system_identifier, ctx.server.database)
    if state.get("identity") != identity:  # another server or database: start over from a baseline
        state.clear()
        state["identity"] = identity
    hashes: dict[str, dict[Key, str]] = state.setdefault("hashes", {})
    warned: set[tuple[str, str]] = state.setdefault("warned", set())
    signatures: dict[str, int | None] = state.setdefault("signatures", {})
    outcome = ctx.given  # the hash queries done in the fast lane's statement of this tick (reaper.daemon.rides)
    if outcome is None:
        batch = hash_queries(ctx.server.major)
        if not batch:
            raise MetricError(NAME, f"no hash queries for PostgreSQL {ctx.server.major}")
        outcome = await ctx.conn.run_tick(db.TickRequest(batch=batch))
    if outcome.errors and not outcome.rows:
        raise MetricError(NAME, "; ".join(f"{n}: {e}" for n, e in sorted(outcome.errors.items())))
    for name, message in sorted(outcome.errors.items()):
        if (name, message) not in warned:
            warned.add((name, message))
            log.warning("change_events: %s failed, its changes are not detected until it works: %s", name, message)
    result: Result = []
    counts: dict[str, Counts] = {}
    for category in CATEGORIES:
        rows = outcome.rows.get(category.hashes)
        counts[category.label] = Counts()
        if rows is None:
            continue
        sig = signature(category, rows)
        if sig is not None and category.hashes in hashes and sig == signatures.get(category.hashes):
            continue  # the same objects with the same values, in the same order: no change
        if len(rows) <= INLINE_COMPARE_ROWS:
            new, changes, found = compare(category, hashes.get(category.hashes), rows, ctx.wall_ns)
        else:
            new, changes, found = await trio.to_thread.run_sync(compare, category, hashes.get(category.hashes),
                                                                rows, ctx.wall_ns)
        hashes[category.hashes] = new
        signatures[category.hashes] = sig  # with the state it describes (not before: a cancelled compare)
        counts[category.label] = found
        if changes:
            result.append((category.table, changes))
    if any(c.total for c in counts.values()):
        details = summary(counts)
        log.info("source %s: detected changes [created/altered/dropped]: %s", ctx.source.name, details)
        result.append((NAME, [{"epoch_ns": ctx.wall_ns, "details": details}]))
    return result

