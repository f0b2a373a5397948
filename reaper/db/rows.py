"""Rows of a metric as the sinks want them: dicts whose numbers are already in the form Go's encoding/json
writes (reaper.sinks.encode), decided per column from the prepared statement's types, so that a JSON sink
hands them to orjson without its own pass over every value (Measurement.go_ready)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import attrs

_INT53 = float(2**53)


class RowLimit:
    """At most this many rows of one metric (`[collector] max_rows_per_metric`; the daemon sets it). Each metric's
    statement asks the server for one row more, so that a runaway metric (a custom query without its WHERE)
    fails with one clear error, its rows not kept, instead of swelling the process and holding up every source:
    3 million rows of one metric were 2 GB of RSS and a 40 s tick. The shipped metrics return at most 100000."""

    value = 100_000


class TooManyRows(Exception):
    """A metric returned more than RowLimit.value rows (its rows are not kept)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"returned more than {limit} rows ([collector] max_rows_per_metric = {limit}); none kept: "
                         "narrow the metric's query or raise the limit")


@attrs.frozen(slots=True)
class RowShape:
    """Which columns of a metric's rows hold floats (made Go-ready one by one) or containers (walked)."""

    floats: tuple[str, ...]
    nested: tuple[str, ...]


_FLOAT_TYPES = frozenset({"float4", "float8"})
_PLAIN_KINDS = frozenset({"scalar", "enum", "range", "multirange"})


#: values shared by every connection, per table (at most this many kept; past it, each connection keeps its own)
SHARED_MAX = 4096
_descriptions: dict[tuple[tuple[str, ...], RowShape | None], tuple[tuple[str, ...], RowShape | None]] = {}
T = TypeVar("T")


def one_copy(table: dict[T, T], value: T) -> T:
    """`value`, or the equal one the process keeps already: a thousand sources running the same metric keep one
    copy of what describes it, not one each (issue 14)."""
    known = table.get(value)
    if known is not None:
        return known
    if len(table) < SHARED_MAX:
        table[value] = value
    return value


def describe(attributes: Sequence[Any]) -> tuple[tuple[str, ...], RowShape | None]:
    """A metric's column names and RowShape from its prepared statement's attributes, one copy for the whole
    process (`one_copy`)."""
    return one_copy(_descriptions, (tuple(a.name for a in attributes), row_shape(attributes)))


def row_shape(attributes: Sequence[Any]) -> RowShape | None:
    """From a prepared statement's attributes: float columns, and columns (arrays, records, json) whose
    values may hold floats at any depth. None when no column needs anything."""
    floats = tuple(a.name for a in attributes if a.type.name in _FLOAT_TYPES)
    nested = tuple(a.name for a in attributes
                   if a.type.kind not in _PLAIN_KINDS or a.type.name in ("json", "jsonb", "record"))
    return RowShape(floats, nested) if floats or nested else None


def go_rows(columns: tuple[str, ...], shape: RowShape | None, records: Any) -> tuple[list[dict[str, Any]], bool]:
    """The rows of one metric as dicts, integral floats as ints (the text Go's encoding/json writes for
    them; the value is the same number). True with them when no value is left that a JSON sink must still
    rewrite (reaper.sinks.encode: tiny or huge floats, -0.0, floats inside arrays or records)."""
    # (no strict= keyword: passing it makes zip() a quarter slower, 0.1 us per row; a record has its columns)
    rows = [dict(zip(columns, r)) for r in records]  # noqa: B905
    if shape is None or not rows:
        return rows, True
    ready = not shape.nested
    floats = shape.floats
    for row in rows:
        for c in floats:
            v = row[c]
            if type(v) is not float:  # None; or no float now (its table's column changed type since described)
                continue
            if v.is_integer():
                if -_INT53 < v < _INT53 and (v or math.copysign(1.0, v) > 0):
                    row[c] = int(v)
                else:
                    ready = False
            elif 1e-6 <= abs(v) < 1e-5:
                ready = False
    return rows, ready
