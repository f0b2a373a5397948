"""Top-N with an exact remainder: keep a metric's N leading rows, fold the rest into ONE `other` row.

Pure: `TopNState.fold(rows)` per measurement of one metric of one source; the state remembers, per
series (the row's `key` columns), what it needs between measurements. Settings: reaper.config.topn.

What comes out
- At most N rows as they came (the members), plus one row whose key columns are "other", whose other
  tag columns and non-numeric columns are left out, and whose numeric columns are sums: gauges are the
  sum over the rows folded now; counters are the sum over the rows folded now plus what is carried
  (below); `rows_folded` is how many rows it sums. Sums are exact for whole numbers and Decimal
  (PostgreSQL numeric); float columns are summed with math.fsum (correctly rounded).
- Membership: the N rows with the largest `by` value (missing values last; on a tie a current member
  stays, then the smaller key). A row that entered stays for `min_stay_intervals` measurements even if
  it falls behind; members never number more than N, so a measurement has at most N + 1 rows.

Counters stay monotonic, and the sum over all rows stays exact
- A row that ENTERS the top N keeps in `other` what it had accumulated while it was folded: its
  counters are reported from then on relative to that value (a fresh series that starts near 0).
  So `other` does not drop, and the sum over the rows is unchanged. A row new to the source that enters
  at once is reported with its full value.
- A row that LEAVES the top N takes its whole cumulative value into `other`: `other` jumps up by the
  value its series had shown since it entered, and the row's series ends. Across that one interval,
  `other`'s own rate shows that jump (the leaver's accumulated value arrives at once), while the rate
  of the SUM over all rows stays right (the value moved, it was not created). Rates of single members
  are always right; rates of `other` are right in every interval without a membership change.
- A row that vanishes from the source (pg_stat_statements evicted it, a table was dropped) or whose
  counters went backwards (a stats reset) leaves in `other` what `other` held for it (a folded row's
  last value, a member's value from before it entered), so `other` never decreases; the sum over the
  rows then also counts that much work the source itself has forgotten, as a counter would. A member
  reported in full that resets shows the reset in its own series.
- The state is in memory: after a restart of reaper (or a changed top_n setting) `other` starts again
  from the rows folded then, which a rate() sees as one counter reset.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from reaper.config.topn import OTHER, ROWS_FOLDED, ActiveTopN

Number = int | float | decimal.Decimal
Key = tuple[Any, ...]
_EXACT = decimal.Context(prec=200)  # Decimal sums of PostgreSQL numerics without rounding


def is_number(value: Any) -> bool:
    """A value top-N sums, ranks and carries; NaN (float, or PostgreSQL numeric's) is none: it is no amount, and
    a Decimal NaN raises on every comparison (a metric with one took its source down)."""
    if isinstance(value, float):
        return value == value
    if isinstance(value, decimal.Decimal):
        return not value.is_nan()
    return isinstance(value, int) and not isinstance(value, bool)


def add(a: Number, b: Number) -> Number:
    if isinstance(a, float) or isinstance(b, float):
        return math.fsum((float(a), float(b)))
    if isinstance(a, decimal.Decimal) or isinstance(b, decimal.Decimal):
        return _EXACT.add(decimal.Decimal(a), decimal.Decimal(b))
    return a + b


def subtract(a: Number, b: Number) -> Number:
    if isinstance(a, float) or isinstance(b, float):
        return float(a) - float(b)
    if isinstance(a, decimal.Decimal) or isinstance(b, decimal.Decimal):
        return _EXACT.subtract(decimal.Decimal(a), decimal.Decimal(b))
    return a - b


def exact_sum(values: Iterable[Number]) -> Number:
    """The sum: int for ints, exact Decimal when any is Decimal, math.fsum when any is a float."""
    items = list(values)
    if any(isinstance(v, float) for v in items):
        return math.fsum(float(v) for v in items)
    if any(isinstance(v, decimal.Decimal) for v in items):
        total = decimal.Decimal(0)
        for v in items:
            total = _EXACT.add(total, decimal.Decimal(v))
        return total
    return sum(items, 0)


def _accumulate(into: dict[str, Number], values: Mapping[str, Number]) -> None:
    for column, value in values.items():
        into[column] = add(into[column], value) if column in into else value


@attrs.define
class Member:
    entered: int  # the measurement number at which it entered
    offset: dict[str, Number]  # counters accumulated while folded, still carried in `other`


@attrs.define
class TopNState:
    """The folding state of one metric of one source."""

    settings: ActiveTopN
    is_gauge: Callable[[str], bool]
    measurements: int = 0
    members: dict[Key, Member] = attrs.field(factory=dict)
    last: dict[Key, dict[str, Number]] = attrs.field(factory=dict)  # counters of every row last seen
    vanished: dict[str, Number] = attrs.field(factory=dict)  # carried counters of vanished or reset rows
    other_shown: bool = False

    def _counters(self, row: Mapping[str, Any]) -> dict[str, Number]:
        return {c: v for c, v in row.items()
                if is_number(v) and c != "epoch_ns" and not c.startswith("tag_") and not self.is_gauge(c)}

    def _forget(self, key: Key) -> None:
        """A series gone (or reset): what it had in `other` stays there, carried."""
        member = self.members.get(key)
        _accumulate(self.vanished, member.offset if member is not None else self.last.get(key, {}))
        if member is not None:
            member.offset = {}
        self.last.pop(key, None)

    def fold(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The members (counters relative to their entry where they had been folded) and `other`."""
        s = self.settings
        self.measurements += 1
        keyed: dict[Key, dict[str, Any]] = {}
        extras: list[dict[str, Any]] = []  # rows repeating a key: always folded, no state kept
        counters: dict[Key, dict[str, Number]] = {}
        for row in rows:
            key = tuple(row.get(k) for k in s.key)
            if key in keyed:
                extras.append(row)
                continue
            keyed[key] = row
            counters[key] = self._counters(row)
        for key in [k for k in self.last if k not in keyed]:
            self._forget(key)
            self.members.pop(key, None)
        for key, now in counters.items():
            before = self.last.get(key)
            if before is not None and any(c in before and subtract(v, before[c]) < 0 for c, v in now.items()):
                self._forget(key)  # a reset: the old value stays carried, the row starts over
        chosen = self._choose(keyed)
        for key in list(self.members):
            if key not in chosen:
                del self.members[key]  # leaves: its full value is folded from now on
        for key in chosen:
            if key not in self.members:
                self.members[key] = Member(entered=self.measurements, offset=dict(self.last.get(key, {})))
        out: list[dict[str, Any]] = []
        folded: list[dict[str, Any]] = list(extras)
        for key, row in keyed.items():
            member = self.members.get(key)
            if member is None:
                folded.append(row)
            elif member.offset:
                out.append({c: (subtract(v, member.offset[c]) if c in member.offset and is_number(v) else v)
                            for c, v in row.items()})
            else:
                out.append(row)
        self.last = counters
        carried: dict[str, Number] = dict(self.vanished)
        for member in self.members.values():
            _accumulate(carried, member.offset)
        if folded or carried or self.other_shown:
            out.append(self._other(rows, folded, carried))
            self.other_shown = True
        return out

    def _choose(self, keyed: Mapping[Key, Mapping[str, Any]]) -> list[Key]:
        s = self.settings
        staying = [k for k, m in self.members.items()
                   if k in keyed and self.measurements - m.entered < s.min_stay_intervals][:s.n]

        def rank(key: Key) -> tuple[Any, ...]:
            value: Any = keyed[key].get(s.by)
            if not is_number(value):
                return (1, 0, 0 if key in self.members else 1, repr(key))  # no value: after every valued row
            return (0, -value, 0 if key in self.members else 1, repr(key))

        rest = sorted((k for k in keyed if k not in staying), key=rank)
        return staying + rest[:max(0, s.n - len(staying))]

    def _other(self, rows: list[dict[str, Any]], folded: list[dict[str, Any]],
               carried: Mapping[str, Number]) -> dict[str, Any]:
        other: dict[str, Any] = {}
        if rows and "epoch_ns" in rows[0]:
            other["epoch_ns"] = rows[0]["epoch_ns"]
        for k in self.settings.key:
            other[k] = OTHER
        columns: dict[str, None] = {}
        for row in rows:
            for c, v in row.items():
                if is_number(v) and c != "epoch_ns" and not c.startswith("tag_") and c not in other:
                    columns[c] = None
        for c in carried:
            columns.setdefault(c, None)
        for c in columns:
            values: list[Number] = [row[c] for row in folded if is_number(row.get(c))]
            if not self.is_gauge(c) and c in carried:
                values.append(carried[c])
            other[c] = exact_sum(values)
        other[ROWS_FOLDED] = len(folded)
        return other
