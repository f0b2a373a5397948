"""The slow lane's connection is not closed and reopened between runs (issue 14, under MockClock).

The slow lane closes its connection after being idle for max(60 s, 2 x the longest interval it serves),
so work that comes every interval keeps one connection: a reconnect costs set-up statements and a
server fork, and would drop the session's statement_timeout (reaper.db.SourceConnection.timeout).
"""

from __future__ import annotations

import pytest
import trio
from fakes import FakeConnector, catalog, source, sql_metric

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
