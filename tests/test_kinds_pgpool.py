"""kind = "pgpool": a real Pgpool-II (Debian's pgpool2, 4.3) in front of the test PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from kinds_programs import Program, start_pgpool
from pgserver import ServerHandle

from reaper import db
from reaper.catalog.metrics import load_shipped_definitions
from reaper.db.simple import open_simple_connection
from reaper.errors import SourceUnavailable

pytestmark = pytest.mark.pg


@pytest.fixture(scope="module")
def pgpool(pg15: ServerHandle) -> Iterator[Program]:
    prog = start_pgpool(pg15)
    yield prog
    prog.stop()


async def test_shipped_pgpool_metrics_return_their_columns(pgpool: Program, pg15: ServerHandle) -> None:
    shipped = load_shipped_definitions().metrics
    async with db.open_loop():
        conn = await open_simple_connection(f"postgresql://postgres@127.0.0.1:{pgpool.port}/postgres",
                                            kind="pgpool", statement_timeout_seconds=5)
        try:
            server = conn.server
            assert server.version.startswith("Pgpool-II 4.") and server.major == 4
            batch = {name: shipped[name].sql_for(server.major) for name in ("pgpool_stats", "pgpool_processes")}
            outcome = await conn.run_tick(db.TickRequest(batch=batch))  # type: ignore[arg-type]
            # a PostgreSQL query through Pgpool-II works too (it is a proxy, not a console)
            assert (await conn.fetch("select 41 + 1 as answer")) == [{"answer": 42}]
        finally:
            await conn.close()
    assert outcome.errors == {}
    for name, rows in outcome.rows.items():
        assert rows, name
        for row in rows:
            assert list(row) == ["epoch_ns", *shipped[name].columns], name
    [node] = outcome.rows["pgpool_stats"]
    assert (node["node_id"], node["hostname"], node["port"], node["status"]) == (0, pg15.host, pg15.port, "up")
    assert isinstance(node["lb_weight"], float) and isinstance(node["select_cnt"], int)
    assert isinstance(node["load_balance_node"], bool)
    processes = outcome.rows["pgpool_processes"]
    assert len(processes) == 4  # num_init_children; Pgpool-II 4.3 sends an empty result set first
    assert all(isinstance(p["pool_pid"], int) for p in processes)
    ours = [p for p in processes if p["database"] == "postgres"]
    assert ours and ours[0]["username"] == "postgres"


async def test_a_command_past_its_deadline_drops_the_connection(pgpool: Program) -> None:
    """No server-side statement_timeout on a pooler: the client-side deadline ends the connection."""
    async with db.open_loop():
        conn = await open_simple_connection(f"postgresql://postgres@127.0.0.1:{pgpool.port}/postgres",
                                            kind="pgpool", statement_timeout_seconds=5)
        started = trio.current_time()
        with pytest.raises(SourceUnavailable, match=r"did not answer within 0\.5s"):
            await conn.run_tick(db.TickRequest(batch={}, solo={"slow": db.SoloQuery("select pg_sleep(30)", 0.5)}))
        assert trio.current_time() - started < 10
        assert conn.is_closed
        await conn.close()
