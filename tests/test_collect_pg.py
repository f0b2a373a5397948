"""The source loop against a real PostgreSQL 15 (started by the fixtures)."""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import socket
import uuid
from collections.abc import Iterator

import pytest
import trio
from pgserver import PgServer

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg

EPOCH = "(extract(epoch from now()) * 1e9)::int8 as epoch_ns"


def metric(name: str, body: str) -> MetricDef:
    return MetricDef(name=name, description=name, sql={14: f"select {EPOCH}, {body}"})


def catalog(*metrics: MetricDef) -> Catalog:
    defs = {m.name: m for m in metrics}
    defs["instance_up"] = MetricDef(name="instance_up", description="up", special=True)
    return Catalog(metrics=defs, presets={})


@pytest.fixture
def role(monitor_role):
    return monitor_role


def dsn_for(server, role, db: str) -> str:
    name, password = role
    return server.dsn(user=name, dbname=db, password=password)


async def wait_for(predicate, limit: float = 20.0, step: float = 0.05) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(step)


async def run_until(reaper: SourceReaper, predicate, limit: float = 20.0) -> None:
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(reaper.run)
        await wait_for(predicate, limit)
        n.cancel_scope.cancel()


async def test_five_due_metrics_are_one_executed_statement_per_tick(pg15, fresh_db, role) -> None:
    names = [f"m{i}" for i in range(5)]
    cat = catalog(*(metric(n, f"{i} as v{i}, (select count(*) from pg_stat_activity) as sessions")
                    for i, n in enumerate(names)))
    src = SourceConfig(name="one", dsn=dsn_for(pg15, role, fresh_db), metrics=dict.fromkeys(names, 1))
    got: list[Measurement] = []
    reaper = SourceReaper(src, cat, got.append)
    await run_until(reaper, lambda: len(got) >= 5 * 4)  # stops right after a tick, long before the next
    ticks = reaper.state.ticks
    rows = pg15.psql(
        f"select calls, query like 'select pg_is_in_recovery()%' from pg_stat_statements s "
        f"join pg_roles r on r.oid = s.userid "
        f"where r.rolname = '{role[0]}' and calls > 0")
    entries = [(int(c), flag == "t") for c, flag in (line.split("|") for line in rows.splitlines())]
    combined = [c for c, is_batch in entries if is_batch]
    other_calls = sum(c for c, is_batch in entries if not is_batch)
    assert combined == [ticks]  # one combined statement, executed once per tick
    assert other_calls <= 6  # only the connection's one-time set-up (server facts, type introspection)
    assert {m.metric for m in got} == set(names)
    assert len(got) == 5 * ticks


async def test_native_types_arrive_intact(pg15, fresh_db, role) -> None:
    body = ("12345678901234::int8 as big, 1.2345678901234567890123::numeric as exact, 'NaN'::numeric as nan_num,"
            " 'infinity'::float8 as inf, timestamptz '2024-01-02 03:04:05.123456+00' as ts,"
            " interval '1 day 02:03:04.5' as span, true as flag, 'x'::text as tag_label, null::int as nothing,"
            " 2.5::float8 as f")
    src = SourceConfig(name="types", dsn=dsn_for(pg15, role, fresh_db), metrics={"types": 60, "other": 60})
    got: list[Measurement] = []
    reaper = SourceReaper(src, catalog(metric("types", body), metric("other", "1 as one")), got.append)
    await run_until(reaper, lambda: len(got) >= 2)
    (row,) = next(m for m in got if m.metric == "types").rows
    assert isinstance(row["epoch_ns"], int)
    assert row["big"] == 12345678901234 and isinstance(row["big"], int)
    assert row["exact"] == decimal.Decimal("1.2345678901234567890123")
    assert row["nan_num"].is_nan()
    assert row["inf"] == float("inf")
    assert row["ts"] == dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
    assert row["span"] == dt.timedelta(days=1, hours=2, minutes=3, seconds=4.5)
    assert row["flag"] is True and row["tag_label"] == "x" and row["nothing"] is None and row["f"] == 2.5
    assert reaper.state.statements_last_tick == 1


async def test_failing_metric_is_isolated_and_the_others_arrive_in_the_same_tick(pg15, fresh_db, role,
                                                                                 caplog) -> None:
    cat = catalog(metric("good1", "1 as v"), metric("good2", "2 as v"),
                  metric("bad", "1 / (select count(*) from pg_database where datname = 'no such db')::int as v"))
    src = SourceConfig(name="iso", dsn=dsn_for(pg15, role, fresh_db), metrics={"good1": 1, "good2": 1, "bad": 1})
    got: list[Measurement] = []
    reaper = SourceReaper(src, cat, got.append)
    lanes = {}

    def done() -> bool:
        lanes.update({lane.name: lane for lane in reaper.status().lanes})
        return len(got) >= 2 * 3 and "slow" in lanes and lanes["slow"].statements_total >= 1

    await run_until(reaper, done)
    first_tick = {m.metric for m in got[:2]}
    assert first_tick == {"good1", "good2"}
    assert [m.metric for m in got].count("good1") == reaper.state.ticks
    assert "bad" not in {m.metric for m in got}
    assert reaper.state.degraded == {"bad"}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "source iso" in errors[0] and "metric bad" in errors[0] and "division by zero" in errors[0]
    # after isolation: one combined statement in the fast lane; the bad one runs alone in the slow lane
    assert reaper.state.statements_last_tick == 1
    assert lanes["slow"].connected and lanes["fast"].statements_last_run == 1


async def test_metric_missing_on_this_server_is_isolated_not_fatal(pg15, fresh_db, role) -> None:
    cat = catalog(metric("good", "1 as v"), metric("missing", "x from no_such_view"))
    src = SourceConfig(name="missing", dsn=dsn_for(pg15, role, fresh_db), metrics={"good": 1, "missing": 1})
    got: list[Measurement] = []
    reaper = SourceReaper(src, cat, got.append)
    await run_until(reaper, lambda: len(got) >= 2)
    assert [m.metric for m in got] == ["good"] * reaper.state.ticks
    assert reaper.state.degraded == {"missing"}


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel completes the handshake) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


async def test_unreachable_source_does_not_delay_another(pg15, fresh_db, role, blackhole) -> None:
    hole = SourceConfig(name="hole", dsn=f"postgresql://x:secret@127.0.0.1:{blackhole}/db", metrics={"v": 1},
                        connect_timeout_seconds=2)
    ok = SourceConfig(name="ok", dsn=dsn_for(pg15, role, fresh_db), metrics={"v": 1})
    cat = catalog(metric("v", "1 as v"))
    got: list[Measurement] = []
    bad_reaper = SourceReaper(hole, cat, got.append)
    good_reaper = SourceReaper(ok, cat, got.append)
    async with db.open_loop(), trio.open_nursery() as n:
        await n.start(bad_reaper.run)
        await n.start(good_reaper.run)
        await wait_for(lambda: good_reaper.state.ticks >= 6 and bad_reaper.state.status == "down")
        n.cancel_scope.cancel()
    assert "timed out" in (bad_reaper.state.last_error or "")
    assert max(good_reaper.state.lateness) < 0.5
    assert all(m.source == "ok" for m in got)


async def test_server_restart_is_survived_and_logged_once_each_way(role, caplog, tmp_path) -> None:
    with PgServer.create(major=15) as server:
        name, password = "watcher", "s3cret-pw-value"
        server.psql(f"create role {name} login password '{password}' in role pg_monitor")
        src = SourceConfig(name="flaky", dsn=server.dsn(user=name, password=password),
                           metrics={"v": 1, "instance_up": 1})
        got: list[Measurement] = []
        reaper = SourceReaper(src, catalog(metric("v", "1 as v")), got.append, max_backoff=2)
        async with db.open_loop(), trio.open_nursery() as n:
            await n.start(reaper.run)
            await wait_for(lambda: reaper.state.ticks >= 2)
            await trio.to_thread.run_sync(server.stop)
            await wait_for(lambda: reaper.state.status == "down")
            down_ticks = reaper.state.ticks
            await wait_for(lambda: reaper.state.ticks >= down_ticks + 4)
            await trio.to_thread.run_sync(server.start)
            back = trio.current_time()
            await wait_for(lambda: reaper.state.status == "up")
            resumed = trio.current_time() - back
            count = len([m for m in got if m.metric == "v"])
            await wait_for(lambda: len([m for m in got if m.metric == "v"]) > count)
            n.cancel_scope.cancel()
    assert resumed <= 2 + 1 + 0.5  # one backoff period (capped at 2 s) plus the tick
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "down:" in m]) == 1
    assert len([m for m in messages if "up again" in m]) == 1
    assert not any(password in m for m in messages)
    ups = [m.rows[0]["instance_up"] for m in got if m.metric == "instance_up"]
    assert 0 in ups and ups[0] == 1 and ups[-1] == 1


async def test_two_sources_on_one_instance_share_one_fetch_of_an_instance_level_metric(pg15, fresh_db, role,
                                                                                       monkeypatch) -> None:
    from reaper.daemon.cache import InstanceCache

    # the server's answers that hold the metric's rows (its statement runs at every tick, with the metric as a
    # member that runs only when due: reaper.db.combined; tests/test_combined_pg.py shows a member not due
    # does not run)
    fetches: list[str] = []
    real = db.SourceConnection.run_tick

    async def counting(self: db.SourceConnection, request: db.TickRequest) -> db.TickOutcome:
        outcome = await real(self, request)
        fetches.extend(name for name in outcome.rows if name == "shared")
        return outcome

    monkeypatch.setattr(db.SourceConnection, "run_tick", counting)

    marker = f"inst_{uuid.uuid4().hex[:8]}"
    shared = MetricDef(name="shared", description="x", instance_level=True,
                       sql={14: f"select {EPOCH}, 1 as {marker}"})
    cat = catalog(shared, metric("own", "1 as v"))
    cache = InstanceCache(max_age=30)
    got: list[Measurement] = []
    reapers = [SourceReaper(SourceConfig(name=n, dsn=dsn_for(pg15, role, fresh_db), metrics={"shared": 2, "own": 2}),
                            cat, got.append, instance_cache=cache) for n in ("one", "two")]
    async with db.open_loop(), trio.open_nursery() as n:
        for r in reapers:
            await n.start(r.run)
        await wait_for(lambda: all(r.state.ticks >= 3 for r in reapers))
        n.cancel_scope.cancel()
    fetched = len(fetches)
    deliveries = [m for m in got if m.metric == "shared"]
    assert cache.hits >= 2
    assert fetched == len(deliveries) - cache.hits  # every delivery was a fetch or a cache hit, none both
    assert {m.source for m in deliveries} == {"one", "two"}
    assert all(m.rows[0]["real_dbname"] == fresh_db for m in got)


async def test_listed_extensions_are_created_on_a_primary_when_asked(pg15, fresh_db) -> None:
    from reaper.daemon.source import FleetControls

    src = SourceConfig(name="ext", dsn=pg15.dsn(dbname=fresh_db), metrics={"v": 1})
    reaper = SourceReaper(src, catalog(metric("v", "1 as v")), lambda m: None,
                          controls=FleetControls(create_extensions=("pgstattuple", "no_such_extension")))
    extensions: list[frozenset[str]] = []

    def tick_done() -> bool:
        if reaper.conn is not None and "v" in reaper.state.last_fetch:
            extensions.append(reaper.conn.server.extensions)
            return True
        return False

    await run_until(reaper, tick_done)
    assert pg15.psql("select count(*) from pg_extension where extname = 'pgstattuple'", dbname=fresh_db) == "1"
    assert "pgstattuple" in extensions[0]  # the server facts know it now: metrics needing it run


async def test_metrics_with_their_own_timeout_time_out_alone(pg15, fresh_db, role) -> None:
    slow = MetricDef(name="slow", description="x", statement_timeout_seconds=0.5,
                     sql={14: f"select {EPOCH}, pg_sleep(2) is null as slept"})
    patient = MetricDef(name="patient", description="x", statement_timeout_seconds=5,
                        sql={14: f"select {EPOCH}, 1 as ok"})
    cat = catalog(slow, patient, metric("fast", "1 as v"))
    src = SourceConfig(name="timed", dsn=dsn_for(pg15, role, fresh_db), metrics={"slow": 1, "patient": 1, "fast": 1})
    got: list[Measurement] = []
    reaper = SourceReaper(src, cat, got.append)
    await run_until(reaper, lambda: len([m for m in got if m.metric == "patient"]) >= 2)
    delivered = [m.metric for m in got]
    assert "slow" not in delivered  # timed out (0.5 s) every tick, costing nobody else
    assert delivered.count("fast") >= 2 and delivered.count("patient") >= 2
    assert "slow" in reaper.state.degraded  # runs alone (under its own timeout) until it succeeds
