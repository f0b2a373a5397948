"""An extension created or dropped while reaper collects, from outside: a real `reaper run` on a real server.

`reaper check --connect` tells a DBA "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;" for the metrics
that need one. Run while the daemon collected, the metrics that need it never started: the server's
extensions were read once per connection, so only a restart (or an outage) brought them. The batch's one
statement now reports a number that changes with the installed extensions (reaper.db.facts): the next tick
reads them again, in the same round trip's turn, and the metric set follows both ways, with a line in the log.
"""

from __future__ import annotations

import time

import pytest
from pgserver import ServerHandle
from test_daemon import Daemon, wait_until

pytestmark = pytest.mark.pg

# pg_buffercache: a contrib extension that needs no shared_preload_libraries (pg_stat_statements' view would)
BUFFERS = ('[metrics.buffers]\ngauges = ["*"]\nrequires_extension = "pg_buffercache"\n'
           'sql = { 14 = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, count(*) as n'
           ' from pg_buffercache" }\n')


def test_an_extension_created_or_dropped_while_collecting_starts_or_stops_its_metrics(
        pg15: ServerHandle, fresh_db: str, tmp_path) -> None:
    daemon = Daemon(tmp_path)
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)], extra=BUFFERS)
    daemon.config.write_text(daemon.config.read_text().replace("metrics = { ping = 1 }",
                                                               "metrics = { ping = 1, buffers = 1 }"))

    def rows(metric: str) -> int:
        return sum(1 for d in daemon.lines() if d["metric"] == metric)

    daemon.start()
    try:
        wait_until(lambda: "needs the extension pg_buffercache" in daemon.log_text(), what="the metric skipped")
        wait_until(lambda: rows("ping") >= 2, what="two ping rows")
        assert rows("buffers") == 0

        pg15.psql("create extension pg_buffercache", dbname=fresh_db)
        created = time.monotonic()
        wait_until(lambda: rows("buffers") >= 2, limit=20, what="the metric collecting after CREATE EXTENSION")
        assert time.monotonic() - created < 10  # at the next ticks, not at a reconnect
        assert "extension pg_buffercache created in database" in daemon.log_text()

        pg15.psql("drop extension pg_buffercache", dbname=fresh_db)
        wait_until(lambda: "extension pg_buffercache dropped in database" in daemon.log_text(),
                   what="the drop noticed")
        after_drop = rows("buffers")
        pings = rows("ping")
        wait_until(lambda: rows("ping") >= pings + 3, what="three more ping rows")
        assert rows("buffers") == after_drop  # skipped, not failing at every tick

        pg15.psql("create extension pg_buffercache", dbname=fresh_db)  # and back again
        wait_until(lambda: rows("buffers") > after_drop, limit=20, what="the metric collecting again")
    finally:
        assert daemon.stop() == 0
    log = daemon.log_text()
    assert "connected again" not in log and "a: down" not in log  # no reconnect: the same connection followed
    # said once per drop: skipped for want of the extension at the start and after the drop, not at every tick
    assert log.count("needs the extension pg_buffercache") == 2, log
