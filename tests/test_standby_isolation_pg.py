"""A standby whose database defaults to serializable transactions (a DBA's `ALTER DATABASE ... SET
default_transaction_isolation = 'serializable'`, replicated with the catalog) is collected like any other.

Before: every statement on it failed with "cannot use serializable mode in a hot standby" and the source stayed
down for as long as the setting stood.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import PgServer
from test_daemon import Daemon, wait_until

pytestmark = pytest.mark.pg


@pytest.fixture
def serializable_standby() -> Iterator[tuple[PgServer, PgServer]]:
    with PgServer.with_replica("create database app",
                               "alter database app set default_transaction_isolation = 'serializable'") as pair:
        yield pair


def test_a_standby_whose_database_defaults_to_serializable_is_collected(serializable_standby, tmp_path: Path) -> None:
    primary, replica = serializable_standby
    assert replica.psql("show default_transaction_isolation", dbname="app") == "serializable"
    daemon = Daemon(tmp_path)
    daemon.write_config([("standby", replica.dsn(dbname="app"), 1), ("primary", primary.dsn(dbname="app"), 1)])
    daemon.start()
    try:
        wait_until(lambda: len(daemon.times("standby")) >= 3 and len(daemon.times("primary")) >= 3,
                   what="rows from the standby and the primary")
        sources = {s.name: s for s in daemon.fresh_status().sources}
        assert sources["standby"].status == "up"
        assert not sources["standby"].last_error
    finally:
        daemon.kill()
    assert "serializable" not in daemon.log_text()
