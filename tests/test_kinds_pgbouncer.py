"""kind = "pgbouncer": a real PgBouncer (Debian's package) in front of the test PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from kinds_programs import Program, start_pgbouncer
from pgserver import ServerHandle

from reaper import db
from reaper.catalog.metrics import Catalog, load_shipped_definitions
from reaper.config.schema import MetricDef, SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.db.simple import SimpleConnection, open_simple_connection, version_number
from reaper.errors import MetricError, SourceUnavailable
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg

ADMIN = "reaper_pgb_admin"
PASSWORD = f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def pgbouncer(pg15: ServerHandle) -> Iterator[Program]:
    prog = start_pgbouncer(pg15, admin=ADMIN, password=PASSWORD)
    yield prog
    prog.stop()


def admin_dsn(prog: Program, password: str = PASSWORD) -> str:
    return f"postgresql://{ADMIN}:{password}@127.0.0.1:{prog.port}/pgbouncer"


def is_subsequence(part: list[str], whole: tuple[str, ...]) -> bool:
    it = iter(whole)
    return all(name in it for name in part)


async def connect(prog: Program, **kwargs: object) -> SimpleConnection:
    return await open_simple_connection(admin_dsn(prog), kind="pgbouncer", statement_timeout_seconds=5,
                                        **kwargs)  # type: ignore[arg-type]


async def test_shipped_pgbouncer_metrics_return_their_columns(pgbouncer: Program) -> None:
    shipped = load_shipped_definitions().metrics
    async with db.open_loop():
        conn = await connect(pgbouncer)
        try:
            server = conn.server
            assert server.version.startswith("PgBouncer 1.")
            assert server.version_num == version_number(server.version) and server.major == 1
            assert server.in_recovery is False and server.extensions == frozenset()
            assert server.database == "pgbouncer" and server.system_identifier is None
            batch = {name: shipped[name].sql_for(server.major) for name in ("pgbouncer_stats", "pgbouncer_clients")}
            assert all(sql is not None for sql in batch.values())
            outcome = await conn.run_tick(db.TickRequest(batch=batch))  # type: ignore[arg-type]
        finally:
            await conn.close()
    assert outcome.errors == {}
    assert outcome.statements == 2 and not outcome.isolated and outcome.in_recovery is False
    for name, rows in outcome.rows.items():
        assert rows, name
        for row in rows:
            columns = list(row)
            assert columns[0] == "epoch_ns" and isinstance(row["epoch_ns"], int)
            # PgBouncer 1.18 (Debian 12) returns a subset of the newest version's columns, in order
            assert is_subsequence(columns[1:], shipped[name].columns), (name, columns)
    stats = {r["database"]: r for r in outcome.rows["pgbouncer_stats"]}
    assert isinstance(stats["pgbouncer"]["total_query_count"], int)  # numeric counters arrive as int
    assert {"database", "total_xact_count", "total_query_count", "total_received", "total_sent",
            "avg_query_time", "total_wait_time"} <= set(stats["pgbouncer"])
    clients = outcome.rows["pgbouncer_clients"]
    ours = [c for c in clients if c["user"] == ADMIN]
    assert ours and ours[0]["application_name"] == "reaper" and ours[0]["database"] == "pgbouncer"
    assert {"type", "user", "database", "state", "addr", "port", "connect_time"} <= set(ours[0])


async def test_a_failing_command_is_a_metric_error_and_the_connection_stays(pgbouncer: Program) -> None:
    async with db.open_loop():
        conn = await connect(pgbouncer)
        try:
            outcome = await conn.run_tick(db.TickRequest(
                batch={"bad": "select 1", "pools": "show pools"},
                solo={"ping": db.SoloQuery("-- ping", statement_timeout_seconds=2)}))
            assert set(outcome.errors) == {"bad", "ping"}  # PgBouncer rejects pgx's "-- ping" (pgwatch #1570)
            assert "invalid command" in outcome.errors["bad"]
            assert outcome.rows["pools"] and "cl_active" in outcome.rows["pools"][0]
            assert not conn.is_closed
            health = await conn.run_tick(db.TickRequest(batch={}))  # nothing due: the health check runs
            assert health.statements == 1 and health.errors == {} and health.rows == {}
            rows = await conn.fetch("SHOW DATABASES")
            assert "epoch_ns" not in rows[0] and any(r["name"] == "postgres" for r in rows)
            with pytest.raises(MetricError):
                await conn.fetch("select 1")
        finally:
            await conn.close()
        assert conn.is_closed


async def test_wrong_password_wrong_kind_and_dead_pooler_are_source_unavailable(
        pgbouncer: Program, pg15: ServerHandle, tmp_path: Path) -> None:
    async with db.open_loop():
        with pytest.raises(SourceUnavailable, match=r"(?i)password|auth"):
            await open_simple_connection(admin_dsn(pgbouncer, "wrong"), kind="pgbouncer", statement_timeout_seconds=5)
        # a plain PostgreSQL database is not a console: SHOW VERSION fails, said plainly
        with pytest.raises(SourceUnavailable, match="SHOW VERSION failed"):
            await open_simple_connection(pg15.dsn(), kind="pgbouncer", statement_timeout_seconds=5)
        with pytest.raises(SourceUnavailable, match="password_file"):
            await open_simple_connection(f"postgresql://{ADMIN}@127.0.0.1:{pgbouncer.port}/pgbouncer",
                                         kind="pgbouncer", statement_timeout_seconds=5,
                                         password_file=str(tmp_path / "missing"))
        secret = tmp_path / "pw"
        secret.write_text(PASSWORD + "\n")
        conn = await open_simple_connection(f"postgresql://{ADMIN}@127.0.0.1:{pgbouncer.port}/pgbouncer",
                                            kind="pgbouncer", statement_timeout_seconds=5, password_file=str(secret))
        conn.terminate()
        assert conn.is_closed


async def test_pooler_restart_is_source_unavailable_then_reconnects(pg15: ServerHandle) -> None:
    prog = start_pgbouncer(pg15, admin=ADMIN, password=PASSWORD)
    try:
        async with db.open_loop():
            conn = await connect(prog)
            ini = prog.dir / "pgbouncer.ini"
            prog.stop(remove=False)
            with pytest.raises(SourceUnavailable):
                await conn.run_tick(db.TickRequest(batch={"stats": "show stats"}))
            assert conn.is_closed
            conn.terminate()  # safe twice
            await conn.close()
            with pytest.raises(SourceUnavailable):
                await connect(prog)
            prog.start(["pgbouncer", str(ini)])
            conn = await connect(prog)
            outcome = await conn.run_tick(db.TickRequest(batch={"stats": "show stats"}))
            assert outcome.rows["stats"]
            await conn.close()
    finally:
        prog.stop()


async def test_the_source_loop_collects_the_pgbouncer_preset(pgbouncer: Program) -> None:
    """The acceptance path: SourceReaper with the shipped pgbouncer preset over a SimpleConnection."""
    shipped = load_shipped_definitions()
    metrics = dict(shipped.metrics)
    metrics["instance_up"] = shipped.metrics.get("instance_up") or MetricDef(
        name="instance_up", description="up", special=True)
    catalog = Catalog(metrics=metrics, presets=shipped.presets)
    src = SourceConfig(name="bouncer", dsn=admin_dsn(pgbouncer), kind="pgbouncer", preset="pgbouncer",
                       tags={"env": "test"})

    async def connector(config: SourceConfig) -> SimpleConnection:
        return await open_simple_connection(config.dsn, kind="pgbouncer",
                                            statement_timeout_seconds=config.query_timeout_seconds)

    got: list[Measurement] = []
    reaper = SourceReaper(src, catalog, got.append, connector=connector)
    async with db.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        await reaper.tick(["pgbouncer_stats", "pgbouncer_clients"])
        nursery.cancel_scope.cancel()
    by_metric = {m.metric: m for m in got}
    assert set(by_metric) == {"pgbouncer_stats", "pgbouncer_clients"}, reaper.state
    assert reaper.state.status == "up" and not reaper.state.degraded
    for m in by_metric.values():
        assert m.source == "bouncer" and m.tags == {"env": "test"} and m.rows
        assert m.epoch_ns == m.rows[0]["epoch_ns"]
