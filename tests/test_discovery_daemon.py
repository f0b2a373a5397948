"""A postgres-discovery source in the real daemon: databases that appear and disappear are followed."""

from __future__ import annotations

import uuid

import pytest
import trio
from pgserver import quote_ident

from reaper import db
from reaper.config.schema import CollectorConfig, Config, MetricDef, SourceConfig
from reaper.daemon.app import Daemon
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg


class Collect:
    label = "memory"
    spillable = False

    def __init__(self) -> None:
        self.got: list[Measurement] = []

    async def open(self, beside: trio.Nursery | None = None) -> None:
        pass

    async def write(self, batch: list[Measurement]) -> None:
        self.got.extend(batch)

    async def aclose(self) -> None:
        pass


async def wait_for(predicate, limit: float = 30.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.05)


async def test_discovery_follows_databases_created_and_dropped(pg15, tmp_path) -> None:
    prefix = f"t_disc_{uuid.uuid4().hex[:6]}_"
    names = [f"{prefix}{i}" for i in range(5)]
    for n in names:
        pg15.psql(f"create database {quote_ident(n)}")
    ping = MetricDef(name="ping", description="ping",
                     sql={14: "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, current_database() as db"})
    source = SourceConfig(name="inst", dsn=pg15.dsn(), kind="postgres-discovery", include_pattern=f"^{prefix}",
                          exclude_pattern=f"^{prefix}4$", metrics={"ping": 1}, discovery_interval_seconds=1)
    config = Config(sources=(source,), metrics={"ping": ping},
                    collector=CollectorConfig(state_dir=str(tmp_path / "state")))
    sink = Collect()
    daemon = Daemon(config, extra_sinks=[sink])
    try:
        async with db.open_loop(), trio.open_nursery() as n:
            await n.start(daemon.run)
            expected = {f"inst_{x}" for x in names[:4]}  # 4 is excluded
            await wait_for(lambda: {m.source for m in sink.got} >= expected)
            assert set(daemon.sources) == expected
            await trio.to_thread.run_sync(pg15.psql, f"create database {quote_ident(prefix + '5')}")
            await trio.to_thread.run_sync(pg15.psql, f"drop database {quote_ident(names[0])} with (force)")
            await wait_for(lambda: set(daemon.sources) == (expected - {f"inst_{names[0]}"}) | {f"inst_{prefix}5"})
            seen = len(sink.got)
            await wait_for(lambda: any(m.source == f"inst_{prefix}5" for m in sink.got[seen:]))
            assert {m.rows[0]["db"] for m in sink.got if m.source == f"inst_{prefix}5"} == {prefix + "5"}
            daemon.request_stop()
    finally:
        for name in [*names, prefix + "5"]:
            pg15.psql(f"drop database if exists {quote_ident(name)} with (force)")
