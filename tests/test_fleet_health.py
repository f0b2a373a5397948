"""Fleet members and the health endpoints from outside (issue 17): real `reaper run` processes on
PostgreSQL 15, /readiness and /status asked with httpx, the Prometheus sink scraped with httpx.

- `reaper fleet leave` drains a member: it stays up, its /readiness is 503 saying it is draining, the
  other member takes its sources; reaper_fleet_members / reaper_fleet_sources_owned follow.
- a member that lost its coordination session is not ready (503 naming why) until it has it again.
- a source whose first connect hangs (a port that never answers) keeps /readiness at 503 naming it,
  until its connect times out (a first tick attempt has then been made: the source is down, ready).
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pgserver import quote_ident
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import REAPER, Daemon, wait_until

pytestmark = pytest.mark.pg
REFRESH = 1.0  # [fleet] refresh_seconds in these tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Member(Daemon):
    """A `reaper run` with /liveness, /readiness, /status and a Prometheus sink on ports of its own."""

    def __init__(self, tmp: Path, name: str) -> None:
        (tmp / name).mkdir()
        super().__init__(tmp / name)
        self.name = name
        self.health = f"http://127.0.0.1:{free_port()}"
        self.prometheus = free_port()

    def configure(self, sources: list[tuple[str, str, int]], extra: str = "") -> None:
        self.write_config(sources, extra=f'\n[[sinks]]\ntype = "prometheus"\nlisten = "127.0.0.1:{self.prometheus}"\n'
                                         + extra)
        text = self.config.read_text()
        self.config.write_text(text.replace("[collector]\n", f'[collector]\nhttp_listen = "{self.health[7:]}"\n', 1))

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.health + path, timeout=5)

    def ready(self) -> bool:
        return self.get("/readiness").status_code == 200

    def scrape(self) -> dict[str, dict[str, float]]:
        """reaper_fleet_* self-metrics: family -> member label ("" without one) -> value."""
        text = httpx.get(f"http://127.0.0.1:{self.prometheus}/metrics", timeout=5).text
        found: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name.startswith("reaper_fleet_"):
                found[family.name] = {s.labels.get("member", ""): s.value for s in family.samples}
        return found

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def members(tmp_path: Path) -> Iterator[list[Member]]:
    started: list[Member] = []
    yield started
    for m in started:
        m.kill()


@pytest.fixture
def coordination(pg15) -> Iterator[str]:
    """A database of its own for the fleet's coordination sessions."""
    name = f"t_coord_{uuid.uuid4().hex[:8]}"
    pg15.psql(f"create database {quote_ident(name)}")
    yield name
    pg15.psql(f"alter database {quote_ident(name)} allow_connections true")
    pg15.psql(f"drop database if exists {quote_ident(name)} with (force)")


def fleet_section(pg15, db: str, member: str) -> str:
    return f'\n[fleet]\ndsn = "{pg15.dsn(dbname=db)}"\nmember = "{member}"\nrefresh_seconds = {REFRESH}\n'


def collecting(pg15, member: str, db: str) -> int:
    """The member's source connections to the database now (pg_stat_activity)."""
    return int(pg15.psql(f"select count(*) from pg_stat_activity where application_name = 'reaper:{member}' "
                         f"and datname = '{db}'"))


def test_fleet_leave_drains_a_member_readiness_and_fleet_self_metrics_follow(
        pg15, fresh_db, coordination, members: list[Member], tmp_path: Path) -> None:
    sources = [(f"s{i}", pg15.dsn(dbname=fresh_db), 1) for i in range(6)]
    for name in ("m1", "m2"):
        m = Member(tmp_path, name)
        m.configure(sources, fleet_section(pg15, coordination, name))
        members.append(m)
    m1, m2 = members
    m1.start()
    m2.start()
    # both joined and share the 6 sources: each one's Prometheus self-metrics say so, and agree with /status
    wait_until(lambda: all(m.scrape().get("reaper_fleet_members", {}).get("") == 2.0 for m in members),
               limit=20, what="two members in both members' self-metrics")
    wait_until(lambda: sum((o := m1.scrape().get("reaper_fleet_sources_owned", {})).values()) == 6.0
               and len(o) == 2 and min(o.values()) >= 2, limit=4 * REFRESH + 5, what="the six sources shared")
    wait_until(lambda: m1.ready() and m2.ready(), limit=15, what="both members ready")
    owned = m1.scrape()["reaper_fleet_sources_owned"]
    assert set(owned) == {"m1", "m2"} and all(v >= 2 for v in owned.values()), owned
    for m in members:  # each member's view is as of its last refresh
        wait_until(lambda m=m: {x["name"]: len(x["sources"]) for x in m.get("/status").json()["fleet"]["members"]}
                   == owned, limit=2 * REFRESH + 3, what=f"{m.name}'s /status agreeing")
        fleet = m.get("/status").json()["fleet"]
        assert fleet["member"] == m.name and not fleet["leaving"] and fleet["connected"]
        assert fleet["owned"] == owned[m.name] == m.scrape()["reaper_fleet_sources_owned"][m.name]
        wait_until(lambda m=m: collecting(pg15, m.name, fresh_db) == owned[m.name], limit=5,
                   what=f"{m.name}'s connections")

    # `reaper fleet leave`: m2 drains, stays up, is not ready (draining), m1 takes every source
    done = subprocess.run([*REAPER, "fleet", "leave", "--config", str(m2.config)],  # (the status file's pid)
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "fleet member m2" in done.stdout and "left the fleet" in done.stdout
    answer = m2.get("/readiness")
    assert answer.status_code == 503 and "fleet member m2 is draining" in answer.text, answer.text
    assert collecting(pg15, "m2", fresh_db) == 0  # its connections closed before it reported leaving
    fleet = m2.get("/status").json()["fleet"]
    assert fleet["leaving"] and fleet["owned"] == 0 and not fleet["connected"]
    wait_until(lambda: m1.scrape().get("reaper_fleet_members") == {"": 1.0}
               and m1.scrape().get("reaper_fleet_sources_owned") == {"m1": 6.0}, limit=2 * REFRESH + 5,
               what="m1 alone owning the six sources")
    wait_until(lambda: collecting(pg15, "m1", fresh_db) == 6, limit=10, what="m1 collecting all six")
    wait_until(m1.ready, limit=10, what="m1 ready again")
    assert m2.proc is not None and m2.proc.poll() is None
    assert m2.get("/readiness").status_code == 503
    assert m2.get("/liveness").status_code == 200
    # the drained member's self-metrics: without a session it knows no live member and owns nothing
    assert m2.scrape()["reaper_fleet_members"] == {"": 0.0}
    assert m2.scrape()["reaper_fleet_sources_owned"] == {"m2": 0.0}
    for m in members:
        assert m.stop() == 0
        assert "Traceback" not in m.log_text(), m.log_text()[-3000:]


def test_readiness_is_503_while_the_coordination_session_is_lost(pg15, fresh_db, coordination,
                                                                  members: list[Member], tmp_path: Path) -> None:
    m = Member(tmp_path, "solo")
    m.configure([(f"s{i}", pg15.dsn(dbname=fresh_db), 1) for i in range(2)], fleet_section(pg15, coordination, "solo"))
    members.append(m)
    m.start()
    wait_until(m.ready, limit=20, what="ready")
    assert collecting(pg15, "solo", fresh_db) == 2
    # the coordination session ends (and cannot come back for now): sources stop, readiness says why
    pg15.psql(f"alter database {quote_ident(coordination)} allow_connections false;"
              "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'reaper-fleet:solo'")
    wait_until(lambda: m.get("/readiness").status_code == 503, limit=REFRESH + 3, what="not ready")
    wait_until(lambda: "fleet coordination database" in m.get("/readiness").text, limit=5,
               what="the reason in /readiness")
    answer = m.get("/readiness")
    assert answer.status_code == 503 and "fleet member solo: fleet coordination database:" in answer.text
    wait_until(lambda: collecting(pg15, "solo", fresh_db) == 0, limit=REFRESH + 3, what="collection stopped")
    assert m.get("/liveness").status_code == 200
    status = m.get("/status").json()["fleet"]
    assert not status["connected"] and status["error"]
    # back: it joins again, collects again and is ready
    pg15.psql(f"alter database {quote_ident(coordination)} allow_connections true")
    wait_until(m.ready, limit=15, what="ready again")
    assert collecting(pg15, "solo", fresh_db) == 2
    assert m.stop() == 0
    assert "Traceback" not in m.log_text(), m.log_text()[-3000:]


def test_readiness_names_a_source_whose_first_connect_hangs_until_it_times_out(
        pg15, fresh_db, members: list[Member], tmp_path: Path) -> None:
    hole = socket.socket()  # listens, never accepts: a connect to it gets no answer
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    timeout = 8
    try:
        m = Member(tmp_path, "single")
        m.configure([("ok", pg15.dsn(dbname=fresh_db), 1)],
                    f'\n[[sources]]\nname = "hole"\ndsn = "postgresql://x@127.0.0.1:{hole.getsockname()[1]}/db"\n'
                    f'metrics = {{ ping = 1 }}\nconnect_timeout_seconds = {timeout}\n')
        members.append(m)
        started = time.monotonic()
        m.start()
        wait_until(lambda: len(m.times("ok")) >= 2, limit=timeout, what="the other source collecting")
        answer = m.get("/readiness")
        assert time.monotonic() - started < timeout  # still within the hanging connect
        assert answer.status_code == 503, answer.text
        assert "1 of 2 sources have not had a first tick yet: hole\n" in answer.text
        assert [s["status"] for s in m.get("/status").json()["sources"] if s["name"] == "hole"] == ["starting"]
        # its connect times out: the first attempt is over (the source is down), so the daemon is ready
        wait_until(m.ready, limit=timeout + 5, what="ready once the connect timed out")
        hole_status = next(s for s in m.get("/status").json()["sources"] if s["name"] == "hole")
        assert hole_status["status"] == "down" and "timed out" in hole_status["last_error"]
        # not a fleet member: `reaper fleet leave` refuses, naming why
        done = subprocess.run([*REAPER, "fleet", "leave", "--pidfile", str(m.pidfile), "--config", str(m.config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "not a fleet member" in done.stderr, done.stderr
        assert m.stop() == 0
    finally:
        hole.close()
