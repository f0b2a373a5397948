"""Whole presets through the real source loop: every metric collected on the first tick, no error line.

- exhaustive on PostgreSQL 16 as a pg_monitor-only role (issue 3);
- full on a local PostgreSQL 15 with csvlog, OS metrics included, no PL/Python anywhere (issue 7).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import trio
from pgserver import PgServer, create_extensions

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.measurement import Measurement

pytestmark = pytest.mark.pg

# Allowed to be skipped with one warning, and why.
SKIPPABLE = {
    "stat_lock": "no SQL before PostgreSQL 19",
    "reco_add_index": "needs pg_qualstats, which the test servers do not have",
}
# Allowed to deliver no rows on a fresh primary, and why.
MAY_BE_EMPTY = {
    "change_events": "the first run records the baseline",
    "server_log_event_counts": "the first run records where the log ends",
    "archiver": "archive_mode is off", "replication": "no standby", "replication_slots": "no slot",
    "logical_subscriptions": "no subscription", "stat_activity": "nothing runs longer than the threshold",
    "reco_default_public_schema": "nothing to recommend", "reco_disabled_triggers": "none",
    "reco_nested_views": "none", "reco_partial_index_candidates": "needs SELECT on the tables' statistics",
    "reco_sprocs_wo_search_path": "none", "reco_superusers": "a single superuser",
    "reco_drop_index": "no unused index yet", "table_bloat_approx_summary_sql": "needs pg_stats rows",
}


def server_with_role(major: int, settings: dict[str, str] | None = None) -> tuple[PgServer, str]:
    server = PgServer.create(major=major, settings=settings)
    create_extensions(server, "postgres", ["pg_stat_statements", "pg_buffercache", "pgstattuple"])
    password = uuid.uuid4().hex
    server.psql(f"create role mon login password '{password}' in role pg_monitor;"
                "create table t (id int primary key, v text);"
                "insert into t select g, 'x' from generate_series(1, 100) g;"
                "create sequence s; select nextval('s'); analyze t;"
                "create function f(i int) returns int language plpgsql as 'begin return i + 1; end';"
                "select f(1);")
    return server, server.dsn(user="mon", password=password)


async def first_tick(dsn: str, preset: str) -> tuple[list[Measurement], list[logging.LogRecord], SourceReaper]:
    got: list[Measurement] = []
    reaper = SourceReaper(SourceConfig(name="src", dsn=dsn, preset=preset), Catalog.for_config(), got.append)
    handler = _Records()
    logger = logging.getLogger("reaper")
    level, _ = logger.level, logger.setLevel(logging.INFO)  # (a preset's metric for other versions: said at INFO)
    logger.addHandler(handler)
    try:
        with trio.fail_after(120):
            async with db.open_loop(), trio.open_nursery() as n:
                await n.start(reaper.run)
                # the fast lane's tick ends with instance_up; the slow and local lanes finish on their own time:
                # wait until every active metric was fetched, or failed, or was warned about
                while not settled(reaper, handler.records):
                    await trio.sleep(0.05)
                n.cancel_scope.cancel()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return got, handler.records, reaper


def settled(reaper: SourceReaper, records: list[logging.LogRecord]) -> bool:
    if "instance_up" not in reaper.state.last_fetch:
        return False
    said = " ".join(r.getMessage() for r in records)
    return all(name in reaper.state.last_fetch or f"metric {name} " in said for name in reaper.active_intervals())


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def check(preset: str, got: list[Measurement], records: list[logging.LogRecord], reaper: SourceReaper) -> None:
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert errors == []
    warned = {name for name in reaper.catalog.presets[preset].metrics
              if any(f"metric {name} " in r.getMessage() for r in records)}
    assert warned <= set(SKIPPABLE), warned
    active = set(reaper.active_intervals())  # the primary set: standby-only metrics are not in it
    delivered = {m.metric for m in got}
    missing = active - delivered - warned - set(MAY_BE_EMPTY)
    assert missing == set()
    assert reaper.state.degraded == set()


@pytest.fixture(scope="module")
def pg16() -> Iterator[tuple[PgServer, str]]:
    server, dsn = server_with_role(16)
    with server:
        yield server, dsn


async def test_exhaustive_on_postgresql_16_as_pg_monitor(pg16) -> None:
    _, dsn = pg16
    got, records, reaper = await first_tick(dsn, "exhaustive")
    check("exhaustive", got, records, reaper)
    assert {"cpu_load", "db_stats", "stat_statements", "table_stats"} <= {m.metric for m in got}


async def test_full_on_a_local_server_with_os_metrics_and_no_plpython() -> None:
    server, dsn = server_with_role(15, {"logging_collector": "on", "log_destination": "csvlog"})
    with server:
        assert server.psql("select count(*) from pg_language where lanname like 'plpython%'") == "0"
        got, records, reaper = await first_tick(dsn, "full")
    check("full", got, records, reaper)
    delivered = {m.metric for m in got}
    assert {"cpu_load", "psutil_cpu", "psutil_mem", "psutil_disk", "psutil_disk_io_total"} <= delivered
