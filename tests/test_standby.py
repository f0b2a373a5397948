"""Standby behaviour against a real streaming replica (pg_basebackup) of PostgreSQL 15."""

from __future__ import annotations

import logging
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


def metric(name: str, **kwargs) -> MetricDef:
    return MetricDef(name=name, description=name, sql={14: f"select {EPOCH}, pg_is_in_recovery() as rec"}, **kwargs)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[PgServer, PgServer]]:
    with PgServer.create(major=15) as primary:
        replica = PgServer.create_replica(primary)
        try:
            yield primary, replica
        finally:
            replica.cleanup()


async def test_a_replica_gets_the_standby_set_and_switches_when_promoted(pair, caplog) -> None:
    _primary, replica = pair
    assert replica.psql("select pg_is_in_recovery()") == "t"
    cat = Catalog(metrics={m.name: m for m in (
        metric("everywhere"), metric("primary_only", node_status="primary"),
        metric("standby_only", node_status="standby"), metric("standby_extra"),
        MetricDef(name="instance_up", description="up", special=True))}, presets={})
    src = SourceConfig(name="rep", dsn=replica.dsn(),
                       metrics={"everywhere": 1, "primary_only": 1, "standby_only": 1},
                       standby_metrics={"everywhere": 1, "standby_only": 1, "standby_extra": 1, "primary_only": 1})
    got: list[Measurement] = []
    reaper = SourceReaper(src, cat, got.append)
    with trio.fail_after(60):
        async with db.open_loop(), trio.open_nursery() as n:
            await n.start(reaper.run)
            while len({m.metric for m in got}) < 3:
                await trio.sleep(0.05)
            before = {m.metric for m in got}
            await trio.to_thread.run_sync(replica.promote)
            promoted_at = len(got)
            while not {"primary_only", "everywhere"} <= {m.metric for m in got[promoted_at:] if not m.rows[0]["rec"]}:
                await trio.sleep(0.05)
            first_primary = next(m.epoch_ns for m in got[promoted_at:] if not m.rows[0]["rec"])
            while not any(m.epoch_ns > first_primary for m in got):
                await trio.sleep(0.05)
            n.cancel_scope.cancel()
    # in recovery: the standby set, minus metrics that are primary-only
    assert before == {"everywhere", "standby_only", "standby_extra"}
    assert all(m.rows[0]["rec"] for m in got[:promoted_at])
    # the tick that saw the promotion (its own statement reports it) drops rows of standby-only metrics
    assert not [m for m in got if m.metric == "standby_only" and not m.rows[0]["rec"]]
    # from the next tick on: the primary set
    after = {m.metric for m in got if m.epoch_ns > first_primary}
    assert after == {"everywhere", "primary_only"}
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("now a primary; switching to the primary metric set" in m for m in messages)
    assert reaper.state.in_recovery is False
