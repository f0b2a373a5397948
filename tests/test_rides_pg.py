"""change_events' hash reads riding in the fast lane's ONE statement, against a real PostgreSQL 15 (issue 14;
reaper.daemon.rides): after its first run (its own statement in the slow lane, which gives it a cost
history), it sends nothing of its own, a due configuration_hashes metric with the same SQL is read once for
both, and changes are still detected and delivered."""

from __future__ import annotations

import pytest
import trio
from test_collect_pg import wait_for

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg


def _runs(reaper: SourceReaper, name: str) -> int:
    cost = reaper.cost.metrics.get(name)
    return 0 if cost is None else len(cost.run_list())


async def test_change_events_reads_ride_in_the_tick_and_changes_are_still_found(pg15, fresh_db, monitor_role) -> None:
    role, password = monitor_role
    dsn = pg15.dsn(user=role, dbname=fresh_db, password=password)
    config = SourceConfig(name="ride", dsn=dsn, metrics={"change_events": 1, "configuration_hashes": 1, "wal": 1})
    got: list[Measurement] = []
    reaper = SourceReaper(config, Catalog.for_config(), got.append)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        await wait_for(lambda: _runs(reaper, "change_events") >= 2, limit=30)  # the baseline, then one riding
        slow = next(lane for lane in reaper.status().lanes if lane.name == "slow")
        own = slow.statements_total  # the first run's statement(s): nothing more from now on
        ticks = reaper.state.ticks
        await trio.to_thread.run_sync(lambda: pg15.psql("create table made_while_riding (x int)", dbname=fresh_db))
        await wait_for(lambda: any(m.table == "table_changes" for m in got), limit=30)
        await wait_for(lambda: reaper.state.ticks >= ticks + 2, limit=30)
        lanes = {lane.name: lane for lane in reaper.status().lanes}
        n.cancel_scope.cancel()
    assert own >= 1 and lanes["slow"].statements_total == own, lanes["slow"]
    # still ONE statement per fast tick: per tick that came back (wal is in every one; a tick the cancel cut off
    # mid-statement is counted in `ticks` but neither its statement nor its rows)
    assert reaper.state.statements_total == sum(m.metric == "wal" for m in got) >= reaper.state.ticks - 1
    (change,) = [m for m in got if m.table == "table_changes"]
    assert [(r["tag_table"], r["event"]) for r in change.rows] == [("public.made_while_riding", "create")]
    assert not reaper.state.degraded and not reaper.rides.blocked
    # the fast statement reads pg_settings' reset_val once although both configuration_hashes and
    # change_events want it (the shared entry), and holds change_events' other four reads
    counts = pg15.psql("select string_agg(((length(s.query) - length(replace(s.query, 'reset_val', ''))) / 9)::text, "
                       "',') from pg_stat_statements s join pg_database d on d.oid = s.dbid where "
                       f"d.datname = '{fresh_db}' and s.query like 'select pg_is_in_recovery()%' "
                       "and s.query like '%reset_val%' and s.query like '%pg_proc%'")
    assert counts.strip() and set(counts.strip().split(",")) == {"1"}, counts
    assert any(m.metric == "configuration_hashes" for m in got)  # and the metric is delivered as ever
