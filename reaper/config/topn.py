"""The `top_n` setting: keep a metric's N leading rows and fold the rest into one exact `other` row.

It can be given at three levels, each overriding the one before, key by key:
1. the metric definition (`[metrics.x] top_n = { by = "total_time", key = ["tag_queryid"] }`: how the
   metric folds; with `n` it is on for everyone using the metric),
2. a preset (`[presets.p] top_n = { stat_statements = { n = 50 } }`: presets exhaustive_topn, full_topn),
3. a source (`[[sources]] top_n = { stat_statements = { n = 20 } }`).
`n = 0` turns it off at that level. The folding itself is reaper.daemon.topn. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from reaper.config import rules

DEFAULT_MIN_STAY_INTERVALS = 3
OTHER = "other"  # the value of the key columns of the folded row
ROWS_FOLDED = "rows_folded"  # the folded row's count of rows it sums (a gauge)


def _check_key(_instance: Any, _attribute: Any, value: tuple[str, ...] | None) -> None:
    if value is None:
        return
    if not value:
        raise rules.FieldValueError("expected at least one column name (the columns that identify a row)")
    for name in value:
        if not name:
            raise rules.FieldValueError("expected column names, got an empty one")


def _check_by(_instance: Any, _attribute: Any, value: str | None) -> None:
    if value is not None and not value:
        raise rules.FieldValueError("expected a column name (rows with its largest values are kept)")


@attrs.frozen
class TopN:
    """One level of a top_n setting; None: not given at this level (the level below decides)."""

    n: int | None = attrs.field(default=None, validator=rules.number(0, 1_000_000, optional=True))
    by: str | None = attrs.field(default=None, validator=_check_by)
    key: tuple[str, ...] | None = attrs.field(default=None, validator=_check_key)
    min_stay_intervals: int | None = attrs.field(default=None, validator=rules.number(0, 1_000_000, optional=True))

    def over(self, base: TopN | None) -> TopN:
        """This level's keys, and `base`'s for those this level leaves out."""
        if base is None:
            return self
        return TopN(n=base.n if self.n is None else self.n, by=base.by if self.by is None else self.by,
                    key=base.key if self.key is None else self.key,
                    min_stay_intervals=(base.min_stay_intervals if self.min_stay_intervals is None
                                        else self.min_stay_intervals))


@attrs.frozen
class ActiveTopN:
    """A complete, switched-on top_n setting."""

    n: int
    by: str
    key: tuple[str, ...]
    min_stay_intervals: int = DEFAULT_MIN_STAY_INTERVALS


def resolve(*levels: TopN | None) -> ActiveTopN | None:
    """The effective setting from levels given lowest first (definition, preset, source); None when off.

    Raises ValueError when it is switched on (n >= 1) but `by` or `key` is given at no level."""
    merged: TopN | None = None
    for level in levels:
        if level is not None:
            merged = level.over(merged)
    if merged is None or not merged.n:
        return None
    missing = [name for name in ("by", "key") if getattr(merged, name) is None]
    if missing:
        raise ValueError(f"top_n: n = {merged.n} but no {' or '.join(missing)} (give them in the metric "
                         f"definition or next to n)")
    assert merged.by is not None and merged.key is not None
    stay = DEFAULT_MIN_STAY_INTERVALS if merged.min_stay_intervals is None else merged.min_stay_intervals
    return ActiveTopN(n=merged.n, by=merged.by, key=merged.key, min_stay_intervals=stay)


def definition_problems(where: str, top_n: TopN | None, columns: tuple[str, ...]) -> list[str]:
    """A metric definition's top_n against its declared output columns (when it declares them)."""
    if top_n is None:
        return []
    problems = []
    if columns:
        if top_n.by is not None and top_n.by not in columns:
            problems.append(f"{where}.top_n.by: {top_n.by!r} is not one of the metric's columns")
        for name in top_n.key or ():
            if name not in columns:
                problems.append(f"{where}.top_n.key: {name!r} is not one of the metric's columns")
    if top_n.n and (top_n.by is None or top_n.key is None):
        problems.append(f"{where}.top_n: n is given but not both `by` and `key`")
    return problems


def reference_problems(where: str, top_n: Mapping[str, TopN], metrics: Mapping[str, Any],
                       presets: Iterable[Any] = ()) -> list[str]:
    """A preset's or a source's `top_n` table (`where` = its key path): every metric known, and the setting
    it makes (over the metric definition's, and the given presets' for a source) complete."""
    problems = []
    for name, level in top_n.items():
        metric = metrics.get(name)
        if metric is None:
            problems.append(f"{where}.{name}: unknown metric")
            continue
        try:
            resolve(metric.top_n, *(p.top_n.get(name) for p in presets if p is not None), level)
        except ValueError as e:
            problems.append(f"{where}.{name}: {str(e).removeprefix('top_n: ')}")
    return problems
