"""Top-N with an exact remainder (reaper.daemon.topn, settings reaper.config.topn): unit tests of the folding.

The real-server acceptance test is tests/test_topn_pg.py.
"""

from __future__ import annotations

import decimal
import random
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from reaper.catalog.metrics import Catalog
from reaper.config.load import load_config
from reaper.config.schema import MetricDef, PrometheusSinkConfig
from reaper.config.topn import ActiveTopN, TopN, resolve
from reaper.daemon.topn import TopNState, exact_sum
from reaper.errors import ConfigError
from reaper.measurement import Measurement
from reaper.sinks.prometheus import PrometheusSink

GAUGES = ("size",)


def state(n: int, stay: int = 0, by: str = "time") -> TopNState:
    return TopNState(ActiveTopN(n=n, by=by, key=("tag_id",), min_stay_intervals=stay), lambda c: c in GAUGES)


def row(key: Any, time: Any, calls: Any = 0, size: Any = 0, **more: Any) -> dict[str, Any]:
    return {"epoch_ns": 1, "tag_id": key, "tag_text": f"q{key}", "time": time, "calls": calls, "size": size,
            "note": "text", **more}


def other_of(out: list[dict[str, Any]]) -> dict[str, Any]:
    found = [r for r in out if r["tag_id"] == "other"]
    assert len(found) == 1
    return found[0]


def ids(out: list[dict[str, Any]]) -> set[Any]:
    return {r["tag_id"] for r in out if r["tag_id"] != "other"}


def test_keeps_the_n_largest_and_folds_the_rest_into_one_exact_other_row() -> None:
    rows = [row(i, time=i * 10, calls=i, size=100 + i) for i in range(1, 11)]
    out = state(3).fold([dict(r) for r in rows])
    assert len(out) == 4
    assert ids(out) == {10, 9, 8}
    other = other_of(out)
    assert other["time"] == sum(i * 10 for i in range(1, 8))
    assert other["calls"] == sum(range(1, 8))
    assert other["size"] == sum(100 + i for i in range(1, 8))  # gauges are summed too
    assert other["rows_folded"] == 7
    assert other["epoch_ns"] == 1
    assert "tag_text" not in other and "note" not in other  # other tags and text are not summed
    for column in ("time", "calls", "size"):
        assert sum(r[column] for r in out) == sum(r[column] for r in rows)


def test_decimal_sums_are_exact() -> None:
    rows = [row(i, time=decimal.Decimal(f"123456789012345.{i:03d}") + decimal.Decimal("0.0000000001") * i,
                calls=10**18 + i) for i in range(50)]
    out = state(5).fold(rows)
    for column in ("time", "calls"):
        assert sum((r[column] for r in out), decimal.Decimal(0)) == sum((r[column] for r in rows), decimal.Decimal(0))
    assert isinstance(other_of(out)["time"], decimal.Decimal)
    assert other_of(out)["calls"] == sum(10**18 + i for i in range(45))


def test_mixed_number_types_and_missing_values() -> None:
    assert exact_sum([1, 2, 3]) == 6 and isinstance(exact_sum([1, 2]), int)
    assert exact_sum([decimal.Decimal("0.1"), 2]) == decimal.Decimal("2.1")
    assert exact_sum([0.1] * 10) == 1.0  # fsum: correctly rounded
    out = state(1).fold([row(1, time=5), row(2, time=None, calls=None), row(3, time=True)])
    assert ids(out) == {1}  # a missing `by` ranks last; a bool is no number
    assert other_of(out)["time"] == 0 and other_of(out)["rows_folded"] == 2


def test_a_nan_is_no_amount_and_never_raises() -> None:
    """PostgreSQL's numeric NaN arrives as Decimal('NaN'), on which every comparison raises: a metric with one in
    its `by` or a counter column took its source down (`sorted` in the ranking, the reset check) at every tick."""
    nan = decimal.Decimal("NaN")
    fold = state(2)
    for calls in (nan, 5):  # twice: the second fold compares the counters with the first's
        out = fold.fold([row(1, time=nan, calls=calls), row(2, time=decimal.Decimal(7), calls=1),
                         row(3, time=float("nan"), calls=2), row(4, time=3, calls=3)])
        assert ids(out) == {2, 4}  # the valued rows lead; NaN ranks with the missing ones
        other = other_of(out)
        assert other["rows_folded"] == 2 and other["time"] == 0  # NaN is summed as nothing


def workload(seed: int, keys: int, ticks: int, *, churn: bool = True) -> list[list[dict[str, Any]]]:
    """Cumulative counters per key that grow at rates which change over time (leaders change);
    with churn some keys vanish and new ones appear."""
    rnd = random.Random(seed)
    totals: dict[int, list[int]] = {k: [0, 0] for k in range(keys)}
    next_key = keys
    measurements = []
    for _ in range(ticks):
        hot = set(rnd.sample(sorted(totals), min(5, len(totals))))
        for k, v in totals.items():
            v[0] += rnd.randint(500, 5000) if k in hot else rnd.randint(0, 20)
            v[1] += rnd.randint(0, 3)
        if churn:
            for k in rnd.sample(sorted(totals), 2):
                del totals[k]
            for _ in range(2):
                totals[next_key] = [rnd.randint(0, 100000), 0]
                next_key += 1
        measurements.append([row(k, time=v[0], calls=v[1], size=rnd.randint(0, 9)) for k, v in totals.items()])
    return measurements


@pytest.mark.parametrize("stay", [0, 1, 3])
def test_other_counters_never_decrease_and_sums_stay_exact_while_leaders_change(stay: int) -> None:
    st = state(5, stay=stay)
    last_other: dict[str, Any] = {}
    changes = 0
    previous: set[Any] = set()
    for rows in workload(seed=stay, keys=40, ticks=60, churn=False):
        out = st.fold(rows)
        assert len(out) <= 6
        members = ids(out)
        changes += members != previous
        previous = members
        other = other_of(out)
        for column in ("time", "calls"):
            assert other[column] >= last_other.get(column, 0), column
            assert sum(r[column] for r in out) == sum(r[column] for r in rows)
            for r in out:
                assert r[column] >= 0
        assert sum(r["size"] for r in out) == sum(r["size"] for r in rows)
        last_other = other
    assert changes > 10  # the workload really moved rows in and out


def test_every_series_stays_monotonic_while_rows_enter_and_leave() -> None:
    """Each reported series (a member while it stays one, and `other`) only grows."""
    st = state(4, stay=2)
    seen: dict[Any, dict[str, Any]] = {}
    for rows in workload(seed=7, keys=30, ticks=80, churn=False):
        out = st.fold(rows)
        now = {r["tag_id"]: r for r in out}
        for key, r in now.items():
            if key in seen:
                assert r["time"] >= seen[key]["time"] and r["calls"] >= seen[key]["calls"], key
        seen = now


def test_vanished_rows_and_resets_stay_carried_in_other() -> None:
    st = state(2)
    last: dict[str, Any] = {}
    for rows in workload(seed=3, keys=20, ticks=50, churn=True):
        other = other_of(st.fold(rows))
        assert other["time"] >= last.get("time", 0) and other["calls"] >= last.get("calls", 0)
        last = other
    st = state(1)
    st.fold([row(1, time=100, calls=9), row(2, time=50, calls=7)])
    out = st.fold([row(1, time=1, calls=1), row(2, time=60, calls=8)])  # 1 was reset (went backwards)
    assert ids(out) == {2}
    # 2 entered with its folded 7 calls carried; 1 (reported in full until now) is folded with its new 1
    assert other_of(out)["calls"] == 7 + 1
    assert sum(r["calls"] for r in out) == 8 + 1
    out = st.fold([row(3, time=500, calls=4), row(1, time=2, calls=3)])  # 2 vanished, 3 is new
    assert ids(out) == {3}
    # 3 is new: reported in full; 2 vanished: the 7 `other` held for it stay carried; 1 is folded
    assert other_of(out)["calls"] == 7 + 3
    st.fold([row(3, time=500, calls=4), row(1, time=2, calls=2)])  # a folded row resets: its 3 stay carried
    assert other_of(st.fold([row(3, time=500, calls=4), row(1, time=2, calls=2)]))["calls"] == 7 + 3 + 2


def test_a_row_that_enters_keeps_its_folded_value_in_other() -> None:
    st = state(1)
    st.fold([row("a", time=100, calls=10), row("b", time=50, calls=5)])
    out = st.fold([row("a", time=100, calls=10), row("b", time=150, calls=20)])
    assert ids(out) == {"b"}
    b = next(r for r in out if r["tag_id"] == "b")
    assert (b["time"], b["calls"]) == (100, 15)  # relative to its value while folded
    other = other_of(out)
    assert (other["time"], other["calls"]) == (100 + 50, 10 + 5)  # a's whole value + b's carried 5 calls


def test_membership_is_sticky_for_min_stay_intervals() -> None:
    st = state(1, stay=3)
    st.fold([row("a", time=10), row("b", time=5)])
    for _ in range(2):  # b overtakes a, but a entered 1 and 2 measurements ago: it stays
        assert ids(st.fold([row("a", time=10), row("b", time=50)])) == {"a"}
    assert ids(st.fold([row("a", time=10), row("b", time=50)])) == {"b"}  # the 3rd: a's stay is over
    for _ in range(2):  # now b is sticky even when a leads again
        assert ids(st.fold([row("a", time=99), row("b", time=50)])) == {"b"}
    assert ids(st.fold([row("a", time=99), row("b", time=50)])) == {"a"}


def test_ties_keep_the_current_member_then_the_smaller_key() -> None:
    st = state(2)
    assert ids(st.fold([row("c", time=1), row("b", time=1), row("a", time=1)])) == {"a", "b"}
    # c now ties with b and a: the members stay
    assert ids(st.fold([row("c", time=2), row("b", time=2), row("a", time=2)])) == {"a", "b"}
    st = state(1)
    st.fold([row("b", time=5), row("a", time=1)])
    assert ids(st.fold([row("b", time=5), row("a", time=5)])) == {"b"}


def test_no_other_row_until_something_is_folded() -> None:
    st = state(3)
    out = st.fold([row(1, time=1), row(2, time=2)])
    assert ids(out) == {1, 2} and len(out) == 2
    st.fold([row(i, time=i) for i in range(5)])
    out = st.fold([row(1, time=9)])  # once shown, `other` stays a series (carried values)
    assert other_of(out)["rows_folded"] == 0


def test_resolve_layers_and_defaults() -> None:
    definition = TopN(by="total_time", key=("tag_queryid",))
    assert resolve(definition) is None  # no n: off
    assert resolve(definition, TopN(n=50), TopN(n=20)) == ActiveTopN(n=20, by="total_time", key=("tag_queryid",),
                                                                       min_stay_intervals=3)
    assert resolve(definition, TopN(n=50), TopN(n=0)) is None
    with pytest.raises(ValueError, match="no by or key"):
        resolve(None, TopN(n=5))


SRC = '[[sources]]\nname = "a"\ndsn = "postgresql://localhost/x"\npreset = "exhaustive_topn"\n'
SINK = '[[sinks]]\ntype = "jsonfile"\npath = "-"\n'


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "reaper.toml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        return [p.split(": ", 1)[1] for p in e.problems]
    return []


def test_config_accepts_a_source_override_and_refuses_bad_ones(tmp_path: Path) -> None:
    assert problems(tmp_path, SRC + 'top_n = { stat_statements_all = { n = 20 } }\n' + SINK) == []
    assert problems(tmp_path, SRC + 'top_n = { nope = { n = 20 } }\n' + SINK) == [
        "sources[0].top_n.nope: unknown metric"]
    assert problems(tmp_path, SRC + 'top_n = { db_stats = { n = 20 } }\n' + SINK) == [
        "sources[0].top_n.db_stats: n = 20 but no by or key (give them in the metric definition or next to n)"]
    assert problems(tmp_path, SRC + SINK + '[metrics.m]\nsql = { 11 = "select 1 as x" }\ncolumns = ["x"]\n'
                    'top_n = { n = 2, by = "y", key = ["x"] }\n') == ["metrics.m.top_n.by: 'y' is not one of the "
                                                                      "metric's columns"]


def test_shipped_topn_presets_name_real_columns() -> None:
    catalog = Catalog.for_config()
    for preset in ("exhaustive_topn", "full_topn"):
        p = catalog.presets[preset]
        assert set(p.top_n) == {"stat_statements_all", "table_stats", "index_stats", "sproc_stats", "table_io_stats"}
        for name in p.top_n:
            assert name in p.metrics
            metric = catalog.metrics[name]
            settings = resolve(metric.top_n, p.top_n[name])
            assert settings is not None
            assert settings.by in metric.columns
            assert all(k in metric.columns for k in settings.key)
        assert "stat_statements" not in p.metrics  # stat_statements_all replaces it (same storage table)


def test_prometheus_sink_shows_other_as_an_ordinary_series() -> None:
    definition = MetricDef(name="stat_statements_all", storage_name="stat_statements", gauges=())
    st = TopNState(ActiveTopN(n=2, by="total_time", key=("tag_queryid",)), definition.is_gauge)
    rows = [{"epoch_ns": 10**18, "tag_queryid": str(i), "tag_query": f"select {i}", "calls": i,
             "total_time": decimal.Decimal(i) / 8} for i in range(1, 6)]
    out = st.fold(rows)
    sink = PrometheusSink(PrometheusSinkConfig(listen="127.0.0.1:0"), catalog=lambda: Catalog.for_config())
    m = Measurement.from_rows(source="db1", metric="stat_statements_all", table="stat_statements", rows=out,
                              tags={}, wall_ns=10**18)
    trio.run(sink.write, [m])
    families = {f.name: f for f in text_string_to_metric_families(sink.exposition().decode())}
    calls = {s.labels["queryid"]: s for s in families["pgwatch_stat_statements_calls"].samples}
    assert set(calls) == {"5", "4", "other"}
    assert calls["other"].value == 1 + 2 + 3 and calls["other"].labels == {"dbname": "db1", "queryid": "other"}
    assert calls["5"].labels["query"] == "select 5"
    text = sink.exposition().decode()
    assert "# TYPE pgwatch_stat_statements_calls untyped\n" in text  # counters are untyped in this sink
    assert "# TYPE pgwatch_stat_statements_rows_folded gauge\n" in text
    assert [s.value for s in families["pgwatch_stat_statements_rows_folded"].samples] == [3]


