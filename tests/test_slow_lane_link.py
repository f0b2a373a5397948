"""The slow lane's connection is not closed and reopened between runs, and a lane runs the jobs under the
connection's current statement_timeout first (issue 14, under MockClock).

The slow lane closes its connection after being idle for max(60 s, 2 x the longest interval it serves),
so work that comes every interval keeps one connection: a reconnect costs set-up statements and a
server fork, and would drop the session's statement_timeout (reaper.db.SourceConnection.timeout).
"""

from __future__ import annotations

from typing import Any

import attrs
import fakes
import pytest
import trio
from fakes import FakeConnector, catalog, source, sql_metric

from reaper import db
from reaper.daemon.source import SourceReaper


@pytest.mark.parametrize("interval", [30, 45, 120])
async def test_timed_work_at_its_interval_keeps_one_slow_connection(autojump_clock, interval: int) -> None:
    connector = FakeConnector()
    cat = catalog(sql_metric("fast"), sql_metric("bloat", statement_timeout_seconds=300.0))
    reaper = SourceReaper(source(metrics={"fast": 30, "bloat": interval}), cat, lambda m: None, connector=connector)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(20 * interval)
        n.cancel_scope.cancel()
    assert len(connector.others) == 1, connector.attempts  # opened once...
    runs = connector.others[0].runs
    assert len(runs) >= 19 and {name for _, name in runs} == {"bloat"}  # ...and every run went over it


@attrs.define(eq=False)
class TimeoutTrackingConnection(fakes.FakeConnection):
    """A fake link that keeps the session timeout like reaper.db.SourceConnection: a run under another
    timeout than the session has costs one statement more (counted in `changes`)."""

    timeout: str | None = None
    changes: int = 0

    async def run_one(self, name: str, query: db.SoloQuery) -> list[dict[str, Any]]:
        wanted = db.timeout_ms(query.statement_timeout_seconds)
        if wanted != self.timeout:
            self.timeout, self.changes, self.statements = wanted, self.changes + 1, self.statements + 1
        return await super().run_one(name, query)


async def test_a_lane_runs_a_ticks_jobs_under_the_current_timeout_first(autojump_clock, monkeypatch) -> None:
    monkeypatch.setattr(fakes, "FakeConnection", TimeoutTrackingConnection)  # the slow lane's link
    connector = FakeConnector()
    cat = catalog(sql_metric("fast"), sql_metric("a", statement_timeout_seconds=5.0),
                  sql_metric("b", statement_timeout_seconds=7.0), sql_metric("c", statement_timeout_seconds=9.0))
    reaper = SourceReaper(source(metrics={"fast": 10, "a": 10, "b": 10, "c": 10}), cat, lambda m: None,
                          connector=connector)
    async with trio.open_nursery() as n:
        await n.start(reaper.run)
        await trio.sleep(200)
        n.cancel_scope.cancel()
    link = connector.others[0]
    assert isinstance(link, TimeoutTrackingConnection)
    ticks = len(connector.conn.requests)
    names = [name for _, name in link.runs]
    # every job of every tick ran (none starved by the reordering)...
    assert ticks >= 19 and len(names) >= 3 * (ticks - 1) and all(names.count(x) >= ticks - 1 for x in "abc")
    # ...and the timeout changed twice a tick (the tick's last timeout runs first in the next), not 3 times
    assert link.changes <= 2 * ticks + 1, (link.changes, ticks, names[:9])
    assert names[:6] == ["a", "b", "c", "c", "a", "b"]
