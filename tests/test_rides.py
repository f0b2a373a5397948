"""Special metrics whose reads ride in the fast lane's statement (issue 14; reaper.daemon.rides): which
reads ride and under which key, what the special gets, and when it goes back to its own statement.
Against PostgreSQL: tests/test_rides_pg.py."""

from __future__ import annotations

import logging

from fakes import SERVER, sql_metric

from reaper import db
from reaper.daemon.cost import CostSettings, SourceCost
from reaper.daemon.jobs import Job
from reaper.daemon.rides import RIDE_SECONDS, Rides
from reaper.special import SpecialSpec

READS = {"hashes_a": "select 'a'", "hashes_b": "select 'b'"}


async def _handler(ctx: object) -> list[tuple[str, list[dict[str, object]]]]:
    return []


def special(name: str = "changes", reads: dict[str, str] | None = READS) -> Job:
    spec = SpecialSpec(_handler, reads=None if reads is None else (lambda server: reads))
    return Job(sql_metric(name), 1, 30.0, 60.0, spec=spec)


def costed(*runs: tuple[str, float]) -> SourceCost:
    cost = SourceCost("src", CostSettings())
    for name, seconds in runs:
        cost.record(name, 1.0, seconds, ())
    return cost


def outcome(rows: dict[str, list[dict[str, object]]], errors: dict[str, str] | None = None) -> db.TickOutcome:
    return db.TickOutcome(rows=rows, errors=errors or {}, in_recovery=False, statements=1, isolated=bool(errors),
                          seconds={name: 0.001 for name in rows})


def test_cheap_reads_ride_sharing_a_due_metric_with_the_same_sql() -> None:
    rides = Rides("src")
    batch = {"db_stats": "select 1", "hashes_a": READS["hashes_a"]}  # hashes_a is also due as a metric
    plan = rides.plan([special()], SERVER, batch, costed(("changes", RIDE_SECONDS / 2)))
    assert plan == {"changes": {"hashes_a": "hashes_a", "hashes_b": "changes:hashes_b"}}
    assert batch == {"db_stats": "select 1", "hashes_a": READS["hashes_a"], "changes:hashes_b": READS["hashes_b"]}
    rows = {"db_stats": [{"v": 1}], "hashes_a": [{"h": "a"}], "changes:hashes_b": [{"h": "b"}]}
    left, jobs = rides.take(plan, outcome(rows), [special(), special("other", None)])
    assert set(left.rows) == {"db_stats", "hashes_a"}  # the metric's own rows stay; the private read goes
    given = jobs[0].given
    assert given is not None and given.rows == {"hashes_a": [{"h": "a"}], "hashes_b": [{"h": "b"}]}
    assert given.statements == 0 and set(given.seconds) == {"hashes_a", "hashes_b"}
    assert jobs[1].given is None and not rides.blocked


def test_a_first_run_an_expensive_one_and_a_special_without_reads_keep_their_own_statement() -> None:
    rides = Rides("src")
    for job, cost in ((special(), costed()), (special(), costed(("changes", RIDE_SECONDS))),
                      (special(reads=None), costed(("changes", 0.0)))):
        batch = {"db_stats": "select 1"}
        assert rides.plan([job], SERVER, batch, cost) == {} and batch == {"db_stats": "select 1"}


def test_a_read_failing_in_the_ticks_statement_stops_riding_until_the_source_reconnects(caplog) -> None:
    rides = Rides("src")
    cost = costed(("changes", 0.0))
    batch: dict[str, str] = {}
    plan = rides.plan([special()], SERVER, batch, cost)
    caplog.set_level(logging.INFO)
    left, jobs = rides.take(plan, outcome({"changes:hashes_a": [{"h": "a"}]},
                                          {"changes:hashes_b": "permission denied"}), [special()])
    assert not left.rows and not left.errors  # neither is a metric of the tick: nothing to deliver or fail
    given = jobs[0].given
    assert given is not None and given.errors == {"hashes_b": "permission denied"} and "hashes_a" in given.rows
    assert rides.blocked == {"changes"}
    assert [r.getMessage() for r in caplog.records] == [
        "source src: metric changes: its reads failed in the tick's statement (hashes_b: permission denied); it "
        "sends its own statement in the slow lane from now on"]
    assert rides.plan([special()], SERVER, {}, cost) == {}  # its own statement from now on
