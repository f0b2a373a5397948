"""Timed SQL jobs of one tick sharing ONE statement in the slow lane, against a real PostgreSQL 15 (issue 14;
reaper.daemon.jobs): the statement count, each member's rows and apportioned server time, a member whose
SQL fails (the others' rows kept), and a member turning slow past the group's statement_timeout (it fails
alone, the others deliver that run).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from fakes import catalog
from test_collect_pg import wait_for

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.daemon.sourcestate import connect_source
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg
EPOCH = "(extract(epoch from now()) * 1e9)::int8 as epoch_ns"
Call = tuple[list[str], int, float]  # the metrics of one slow-lane run, its statements, its wall seconds


def timed(name: str, sql: str, timeout: float = 3.0) -> MetricDef:
    return MetricDef(name=name, description=name, sql={14: f"select {EPOCH}, {sql}"}, gauges=("*",),
                     statement_timeout_seconds=timeout)


class Spied:
    """The source's connections; the slow lane's (the second) records each run in `calls`."""

    def __init__(self) -> None:
        self.links: list[Any] = []
        self.calls: list[Call] = []

    async def __call__(self, config: SourceConfig) -> Any:
        link = await connect_source(config)
        self.links.append(link)
        if len(self.links) == 2:
            self._spy(link)
        return link

    def _spy(self, link: Any) -> None:
        run_tick, run_one = link.run_tick, link.run_one

        async def counted(names: list[str], call: Any) -> Any:
            before, started = link.statements, trio.current_time()
            try:
                return await call
            finally:
                self.calls.append((names, link.statements - before, trio.current_time() - started))

        async def tick(request: db.TickRequest) -> db.TickOutcome:
            return await counted(sorted(request.timed), run_tick(request))  # type: ignore[no-any-return]

        async def one(name: str, query: db.SoloQuery) -> list[dict[str, Any]]:
            return await counted([name], run_one(name, query))  # type: ignore[no-any-return]

        link.run_tick, link.run_one = tick, one

    def groups(self) -> list[Call]:
        return [c for c in self.calls if len(c[0]) > 1]


def source_of(dsn: str, *metrics: MetricDef) -> tuple[SourceReaper, list[Measurement], Spied]:
    got: list[Measurement] = []
    spied = Spied()
    config = SourceConfig(name="src", dsn=dsn, metrics={"fast": 1, **{m.name: 1 for m in metrics}})
    fast = MetricDef(name="fast", description="fast", sql={14: f"select {EPOCH}, 1 as v"})
    return SourceReaper(config, catalog(fast, *metrics), got.append, connector=spied), got, spied


def rows_of(got: list[Measurement], metric: str) -> list[list[dict[str, Any]]]:
    return [list(m.rows) for m in got if m.metric == metric]


async def test_cheap_timed_metrics_run_in_one_statement_each_with_its_rows_and_time(pg15, fresh_db) -> None:
    reaper, got, spied = source_of(pg15.dsn(dbname=fresh_db), timed("a", "1 as v"),
                                   timed("b", "pg_sleep(0.05) is null as slept"),
                                   timed("heavy", "pg_sleep(0.4) is null as slept"))  # 13 % of its 3 s
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        await wait_for(lambda: len(spied.groups()) >= 2, limit=15)
        n.cancel_scope.cancel()
    calls = spied.calls
    assert sorted(name for names, _, _ in calls[:3] for name in names) == ["a", "b", "heavy"]  # first: alone
    assert all(len(names) == 1 for names, _, _ in calls[:3])
    assert all(names == ["a", "b"] and statements == 1 for names, statements, _ in spied.groups())
    assert all(names in (["a", "b"], ["heavy"]) for names, _, _ in calls[3:])  # heavy never joins
    for name in ("a", "b"):  # the group's rows look like the rows of its first run, alone
        first, last = rows_of(got, name)[0], rows_of(got, name)[-1]
        assert len(first) == len(last) == 1 and {**first[0], "epoch_ns": 0} == {**last[0], "epoch_ns": 0}, name
    assert rows_of(got, "a")[-1][0]["v"] == 1
    assert len(rows_of(got, "a")) == len(rows_of(got, "b")) >= 3  # one delivery per run each
    a, b = (reaper.cost.metrics[m].last_run() for m in ("a", "b"))  # the group's time, apportioned
    assert 0.05 <= b.seconds < 0.3 and a.seconds < 0.05 and a.rows == b.rows == 1
    assert reaper.cost.metrics["heavy"].last_run().seconds >= 0.4
    assert not reaper.state.degraded and reaper.state.metric_errors == 0


async def test_a_members_failing_sql_keeps_the_others_rows_and_reports_its_error(pg15, fresh_db, caplog) -> None:
    pg15.psql("create table flag (v int); insert into flag values (1); grant select on flag to public",
              dbname=fresh_db)
    reaper, got, spied = source_of(pg15.dsn(dbname=fresh_db), timed("a", "1 as v"),
                                   timed("bad", "1 / (select v from flag) as x"))
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        await wait_for(lambda: len(spied.groups()) >= 1, limit=15)
        await trio.to_thread.run_sync(lambda: pg15.psql("update flag set v = 0", dbname=fresh_db))
        grouped = len(spied.groups())
        delivered = len(rows_of(got, "a"))
        await wait_for(lambda: "bad" in reaper.state.degraded, limit=15)
        failed_run = spied.calls[-1]
        a_cost = reaper.cost.metrics["a"].last_run()
        seen = len(spied.calls)
        await wait_for(lambda: ["bad"] in [names for names, _, _ in spied.calls[seen:]], limit=15)
        n.cancel_scope.cancel()
    # the group failed (1 statement), then each ran alone in the same run (2): a's rows were kept
    assert failed_run[0] == ["a", "bad"] and failed_run[1] == 3 and len(spied.groups()) == grouped + 1
    assert len(rows_of(got, "a")) >= delivered + 1 and rows_of(got, "a")[-1][0]["v"] == 1
    assert a_cost.rows == 1 and "bad" in reaper.cost.metrics  # a costed for that run; bad only for its good runs
    assert reaper.state.metric_errors >= 1
    assert any("metric bad: failed: division by zero" in r.getMessage() for r in caplog.records)
    assert all(len(names) == 1 for names, _, _ in spied.calls[seen:])  # degraded: bad runs alone (and so does a)


async def test_a_member_turning_slow_fails_alone_and_the_others_deliver_that_run(pg15, fresh_db, caplog) -> None:
    """Two cheap metrics share a statement; one turns slow past their 0.8 s timeout: the shared statement is
    cancelled, each member runs again alone at once, the healthy one delivers that run's rows and only the
    slow one fails and is isolated (the README's isolation promise, within the slow lane's groups)."""
    pg15.psql("create table pause (s float8); insert into pause values (0); grant select on pause to public",
              dbname=fresh_db)
    slow = timed("b", "pg_sleep((select s from pause)) is null as slept", 0.8)
    reaper, got, spied = source_of(pg15.dsn(dbname=fresh_db), timed("a", "2 as v", 0.8), slow)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        await wait_for(lambda: len(spied.groups()) >= 1, limit=15)
        await trio.to_thread.run_sync(lambda: pg15.psql("update pause set s = 1.5", dbname=fresh_db))
        grouped = len(spied.groups())
        await wait_for(lambda: "b" in reaper.state.degraded, limit=15)
        delivered = len(rows_of(got, "a"))
        await wait_for(lambda: len(rows_of(got, "a")) > delivered, limit=15)  # and "a" goes on
        n.cancel_scope.cancel()
    cancelled = spied.groups()[grouped]
    assert cancelled[0] == ["a", "b"] and cancelled[1] == 1 and cancelled[2] < 1.45, cancelled  # not 1.5 s
    after = spied.calls[spied.calls.index(cancelled) + 1:]
    assert [names for names, _, _ in after[:2]] == [["a"], ["b"]]  # each alone, right away
    assert 0.7 < after[1][2] < 1.45  # "b" cancelled at its own 0.8 s
    assert reaper.state.degraded == {"b"} and reaper.state.metric_errors == 1
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and "metric b: failed: canceling statement due to statement timeout" in failures[0]
    assert all(len(names) == 1 for names, _, _ in after)  # "b" degraded: no group with it


async def test_the_shipped_bloat_metrics_share_one_statement(pg15, fresh_db) -> None:
    pg15.psql("create extension pgstattuple; create table big with (autovacuum_enabled = off) as select g,"
              " repeat('x', 100) as pad from generate_series(1, 20000) g", dbname=fresh_db)
    # relpages: over 1 MB, a table the metrics read; vacuumed now, so its visibility and free space maps (what
    # pgstattuple_approx reads) no longer change under the test: an autovacuum between two runs changed the
    # estimate of the same rows (12448 -> 16580 bytes free, seen once in CI)
    pg15.psql("vacuum analyze big", dbname=fresh_db)
    names = ("table_bloat_approx_stattuple", "table_bloat_approx_summary")  # the debug preset's, 300 s each
    catalog = Catalog.for_config()
    got: list[Measurement] = []
    spied = Spied()
    config = SourceConfig(name="src", dsn=pg15.dsn(dbname=fresh_db), metrics=dict.fromkeys(names, 1))
    reaper = SourceReaper(config, catalog, got.append, connector=spied)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        await wait_for(lambda: len(spied.groups()) >= 1, limit=15)
        n.cancel_scope.cancel()
    assert spied.groups()[0][:2] == (sorted(names), 1) and not reaper.state.degraded
    for name in names:
        first, last = rows_of(got, name)[0], rows_of(got, name)[-1]
        assert len(rows_of(got, name)) >= 2 and len(first) == len(last) >= 1
        assert {**first[0], "epoch_ns": 0} == {**last[0], "epoch_ns": 0}, name  # as alone (a static table)
