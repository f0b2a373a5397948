"""The per-source caches of the tick's hot path (issue 14): each is recomputed when what it depends on
changes (a reload replaces the config and catalog; a promotion or demotion changes the role)."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import catalog, source, sql_metric

from reaper.catalog.metrics import Catalog
from reaper.daemon.source import SourceReaper


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The roles (standby?) of every Catalog.intervals computation."""
    calls: list[bool] = []
    real = Catalog.intervals

    def counting(self: Catalog, config: Any, *, standby: bool) -> dict[str, int]:
        calls.append(standby)
        return real(self, config, standby=standby)

    monkeypatch.setattr(Catalog, "intervals", counting)
    return calls


def test_active_intervals_are_computed_once_per_config_catalog_and_role(computed: list[bool]) -> None:
    cat = catalog(sql_metric("a"), sql_metric("b"), sql_metric("c"))
    reaper = SourceReaper(source(metrics={"a": 10, "b": 20}, standby_metrics={"c": 5}), cat, lambda m: None)
    for _ in range(5):
        assert reaper.active_intervals() == {"a": 10, "b": 20}
    assert computed == [False]

    reaper.update(source(metrics={"a": 30}, standby_metrics={"c": 5}), cat)  # a reload
    assert reaper.active_intervals() == {"a": 30}
    assert reaper.active_intervals() == {"a": 30}
    assert computed == [False, False]

    reaper.state.in_recovery = True  # the server is now a standby
    assert reaper.active_intervals() == {"c": 5}
    assert computed == [False, False, True]
    reaper.state.in_recovery = False
    assert reaper.active_intervals() == {"a": 30}
    assert computed == [False, False, True, False]

    reaper.catalog = catalog(sql_metric("a"), sql_metric("c"))  # as the reconciler assigns a new catalog
    assert reaper.active_intervals() == {"a": 30}
    assert len(computed) == 5
