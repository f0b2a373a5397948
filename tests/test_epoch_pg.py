"""A metric's epoch_ns that is no time near now, from outside: a real `reaper run` into a postgres and a jsonfile sink.

pgwatch's rows carry their time in `epoch_ns`, nanoseconds since 1970. A custom metric giving seconds (the
usual `extract(epoch from now())::int8` without `* 1e9`) or milliseconds had its rows stored at 1970-01-01
(or in 2262): outside every dashboard's time range, and dropped by the storage's retention at its next
maintenance, without a word. Now such rows get the time they were collected, and the log says so once.
"""

from __future__ import annotations

import json
import time

import pytest
from pgserver import ServerHandle
from test_daemon import Daemon, wait_until

pytestmark = pytest.mark.pg

SECONDS = "select extract(epoch from now())::int8 as epoch_ns, 1 as v"
MILLIS = "select (extract(epoch from now()) * 1000)::int8 as epoch_ns, 2 as v"


def test_an_epoch_in_seconds_or_milliseconds_is_stored_at_the_time_it_was_collected(pg15: ServerHandle, fresh_db: str,
                                                                                  tmp_path) -> None:
    daemon = Daemon(tmp_path)
    metrics = "".join(f'[metrics.{name}]\ngauges = ["*"]\nsql = {{ 11 = "{sql}" }}\n'
                      for name, sql in (("secs", SECONDS), ("millis", MILLIS)))
    daemon.write_config([("a", pg15.dsn(dbname=fresh_db), 1)],
                        extra=metrics + f'[[sinks]]\ntype = "postgres"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n')
    daemon.config.write_text(daemon.config.read_text().replace("metrics = { ping = 1 }",
                                                               "metrics = { ping = 1, secs = 1, millis = 1 }"))
    started = time.time()
    daemon.start()
    try:
        def stored(table: str) -> int:
            out = pg15.psql(f"select count(*) from pg_tables where tablename = '{table}'", dbname=fresh_db).strip()
            return int(pg15.psql(f"select count(*) from {table}", dbname=fresh_db)) if out == "1" else 0

        wait_until(lambda: stored("secs") >= 3 and stored("millis") >= 3, limit=60, what="three rows of each metric")
    finally:
        assert daemon.stop() == 0
    ended = time.time()
    for table in ("secs", "millis"):
        first, last = (float(x) for x in pg15.psql(
            f"select extract(epoch from min(time)), extract(epoch from max(time)) from {table}",
            dbname=fresh_db).strip().split("|"))
        assert started - 5 <= first <= last <= ended + 5, (table, first, last, started)
    for line in daemon.out.read_text().splitlines():
        doc = json.loads(line)
        if doc["metric"] in ("secs", "millis"):
            assert started - 5 <= doc["data"][0]["epoch_ns"] / 1e9 <= ended + 5, doc
    said = [x for x in daemon.log.read_text().splitlines() if ": epoch_ns " in x]
    # one line for the source (a server's clock a day off would make each of its metrics say it)
    assert len(said) == 1 and "years behind reaper's clock" in said[0] and " WARNING " in said[0], said
