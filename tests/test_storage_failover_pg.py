"""A storage cluster that fails over: a `reaper run` whose postgres sink names both hosts (the replica first) writes
to the primary, and after the primary is gone and the replica promoted, goes on writing to the new primary with
nothing lost.

Before: the sink took the first host that answered, the replica, and failed every write with "cannot execute
CREATE SCHEMA in a read-only transaction" for as long as it ran.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import PgServer
from test_daemon import REAPER, Daemon, wait_until

pytestmark = pytest.mark.pg


@pytest.fixture
def cluster() -> Iterator[tuple[PgServer, PgServer]]:
    with PgServer.with_replica("create database metrics") as pair:
        yield pair


def stored(server: PgServer) -> set[int]:
    """The epoch_ns of every ping row in the server's storage (none before the sink made its table)."""
    if server.psql("select to_regclass('public.ping') is null", dbname="metrics") == "t":
        return set()
    text = server.psql("select coalesce(string_agg(data->>'epoch_ns', ','), '') from public.ping", dbname="metrics")
    return {int(v) for v in text.split(",") if v}


def test_a_storage_failover_moves_the_writes_to_the_new_primary_and_loses_nothing(
        cluster: tuple[PgServer, PgServer], tmp_path: Path) -> None:
    primary, replica = cluster
    hosts = f"{primary.host}:{replica.port},{primary.host}:{primary.port}"  # the replica first
    daemon = Daemon(tmp_path)
    daemon.write_config([("rep", replica.dsn(), 1)], extra=f"""
[[sinks]]
type = "postgres"
name = "store"
dsn = "postgresql://postgres@{hosts}/metrics"
batching_delay_seconds = 0.2
connect_timeout_seconds = 2
write_timeout_seconds = 5
""")
    daemon.start()
    try:
        wait_until(lambda: len(stored(primary)) >= 3, what="rows stored on the primary")
        assert f"sink store: connected to postgresql://postgres@{hosts}/metrics, at {primary.host}:{primary.port}" \
            in daemon.log_text()

        primary.stop()
        replica.promote()
        promoted = max(daemon.times("rep"))
        wait_until(lambda: any(t / 1e9 > promoted + 2 for t in stored(replica)), what="rows stored after the failover")
        assert f", at {primary.host}:{replica.port}" in daemon.log_text()
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    # nothing lost: every sample the witness (the jsonfile sink) holds up to the last stored one is stored
    after = stored(replica)
    witness = {json.loads(line)["data"][0]["epoch_ns"] for line in daemon.out.read_text().splitlines()
               if '"ping"' in line}
    assert {t for t in witness if t <= max(after)} <= after
    assert "read-only transaction" not in daemon.log_text()


def test_check_says_in_one_line_that_a_storage_dsn_names_no_host_that_takes_writes(
        cluster: tuple[PgServer, PgServer], tmp_path: Path) -> None:
    _primary, replica = cluster
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path}/state"\n\n[[sinks]]\ntype = "postgres"\nname = "store"\n'
                      f'dsn = "{replica.dsn(dbname="metrics")}"\n')
    out = subprocess.run([*REAPER, "check", "--connect", "--config", str(config)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "sink store: unreachable: no host of the dsn takes writes (each is a standby, or has "
        "default_transaction_read_only = on): point the dsn at the primary, or name every host of the cluster in it "
        "(host1:5432,host2:5432) and reaper writes to the one that takes writes"]
