"""reaper.db.go_rows: rows made Go-ready at decode give the very bytes the sinks' full encoder gives
(reaper.sinks.encode.dumps), and say when they are not ready (a value only the encoder can write)."""

from __future__ import annotations

import math
import types

from hypothesis import given
from hypothesis import strategies as st

from reaper.db.rows import go_rows, row_shape
from reaper.sinks.encode import dumps, dumps_ready


def attribute(name: str, type_name: str, kind: str = "scalar") -> types.SimpleNamespace:
    return types.SimpleNamespace(name=name, type=types.SimpleNamespace(name=type_name, kind=kind))


ATTRS = [attribute("epoch_ns", "int8"), attribute("x", "float8"), attribute("y", "float4"), attribute("t", "text")]
COLUMNS = tuple(a.name for a in ATTRS)
EDGES = [0.0, -0.0, 1.0, -3.0, 300.0, 2.0**53, -(2.0**53), 1e21, 1.5e-6, 1e-6, 1e-5, 0.1, float("nan"),
         float("inf"), 123456789.125, None]
values = st.one_of(st.sampled_from(EDGES), st.floats(allow_nan=True, allow_infinity=True), st.none())


@given(st.lists(st.tuples(values, values), max_size=8))
def test_go_ready_rows_encode_exactly_as_the_full_encoder(pairs: list[tuple[float | None, float | None]]) -> None:
    records = [(i, x, y, "a") for i, (x, y) in enumerate(pairs)]
    expected = dumps([dict(zip(COLUMNS, r, strict=True)) for r in records])
    rows, ready = go_rows(COLUMNS, row_shape(ATTRS), records)
    assert dumps(rows) == expected  # the int form of an integral float is the same JSON
    if ready:
        assert dumps_ready(rows) == expected


def test_values_only_the_encoder_can_write_are_not_ready() -> None:
    shape = row_shape(ATTRS)
    for value in (-0.0, 2.0**60, 3e-6):
        _, ready = go_rows(COLUMNS, shape, [(1, value, 1.0, "a")])
        assert not ready, value
    rows, ready = go_rows(COLUMNS, shape, [(1, 300.0, 0.5, "a"), (2, None, float("nan"), "b")])
    assert ready and rows[0]["x"] == 300 and type(rows[0]["x"]) is int and math.isnan(rows[1]["y"])


def test_arrays_and_records_are_left_to_the_encoder() -> None:
    attrs_ = [attribute("a", "_float8", "array"), attribute("n", "int8")]
    shape = row_shape(attrs_)
    assert shape is not None and shape.nested == ("a",)
    _, ready = go_rows(("a", "n"), shape, [([1.0, 2.5], 3)])
    assert not ready
    assert row_shape([attribute("n", "int8"), attribute("t", "text")]) is None


def test_the_instance_cache_keeps_whether_its_rows_are_go_ready() -> None:
    """Rows another source of the instance fetched keep their readiness (shared deliveries skip the
    encoder's own pass too)."""
    from reaper.daemon.cache import InstanceCache

    cache = InstanceCache(30.0)
    cache.put("ready", 0.0, [{"x": 1}], source="a", go_ready=True)
    cache.put("plain", 0.0, [{"x": 1.5}], source="a")
    ready, plain = cache.get("ready", 1.0, source="b"), cache.get("plain", 1.0, source="b")
    assert ready is not None and ready.go_ready
    assert plain is not None and not plain.go_ready
