"""Fleet mode from outside (issue 17 item 2): real `reaper run` members sharing 60 sources through advisory
locks in a coordination database on PostgreSQL 15; who collects what is read from pg_stat_activity."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import freshstatus
import pytest
from pgserver import quote_ident

pytestmark = pytest.mark.pg
REAPER = [sys.executable, "-m", "reaper.cli"]
PING = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns, 1 as v"
REFRESH = 2.0
DATABASES, ROLES = 6, 10  # 60 sources: one (database, role) pair each, so each backend names its source


def wait_until(predicate: Callable[[], bool], limit: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            raise AssertionError(f"timed out after {limit:g}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


class Member:
    def __init__(self, tmp: Path, name: str, config_text: str) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir()
        self.config = self.dir / "reaper.toml"
        self.config.write_text(f'[collector]\nstate_dir = "{self.dir / "state"}"\n[fleet]\n'
                               + config_text.replace("@MEMBER@", name).replace("@OUT@", str(self.dir / "out.ndjson")))
        self.log = self.dir / "reaper.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([*REAPER, "run", "--config", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=log)

    def status(self):
        """The status file now, after asking the daemon for a fresh one (throttled)."""
        return freshstatus.polled(self.proc.pid if self.proc is not None else None, self.dir / "state")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def fleet_setup(pg15, fresh_db, tmp_path: Path) -> Iterator[tuple[str, dict[tuple[str, str], str]]]:
    """60 sources over 6 databases and 10 roles; the coordination database is fresh_db.
    Yields (the config text with @MEMBER@/@OUT@ placeholders, (datname, usename) -> source name)."""
    tag = uuid.uuid4().hex[:6]
    dbs = [f"t_fleet_{tag}_{i}" for i in range(DATABASES)]
    roles = [f"fleet_{tag}_{j}" for j in range(ROLES)]
    pg15.psql("".join(f"create role {r} login;" for r in roles))
    for db in dbs:
        pg15.psql(f"create database {quote_ident(db)}")
    sources = {(db, role): f"src_{i}_{j}" for i, db in enumerate(dbs) for j, role in enumerate(roles)}
    text = [f'dsn = "{pg15.dsn(dbname=fresh_db)}"\nmember = "@MEMBER@"\nrefresh_seconds = {REFRESH}\n',
            '[[sinks]]\ntype = "jsonfile"\npath = "@OUT@"\n',
            f'[metrics.ping]\ndescription = "ping"\ngauges = ["*"]\n[metrics.ping.sql]\n14 = "{PING}"\n']
    for (db, role), name in sources.items():
        text.append(f'[[sources]]\nname = "{name}"\ndsn = "{pg15.dsn(user=role, dbname=db)}"\n'
                    f'metrics = {{ ping = 1 }}\nconnect_timeout_seconds = 2\n')
    yield "\n".join(text), sources
    for db in dbs:
        pg15.psql(f"drop database if exists {quote_ident(db)} with (force)")
    pg15.psql("".join(f"drop role if exists {r};" for r in roles))


def backends(pg15, sources: dict[tuple[str, str], str]) -> dict[str, list[str]]:
    """source -> the application_name of each reaper backend collecting it now."""
    rows = pg15.psql("select datname, usename, application_name from pg_stat_activity "
                     "where application_name like 'reaper:%'")
    found: dict[str, list[str]] = collections.defaultdict(list)
    for line in rows.splitlines():
        db, user, app = line.split("|", 2)
        if (db, user) in sources:
            found[sources[(db, user)]].append(app)
    return found


def test_three_members_share_sixty_sources_and_two_take_over_a_killed_one(pg15, fleet_setup, tmp_path) -> None:
    config_text, sources = fleet_setup
    members = [Member(tmp_path, f"m{i}", config_text) for i in range(1, 4)]
    doubles: list[tuple[float, str, list[str]]] = []
    last_seen: dict[str, float] = {}
    gaps: dict[str, float] = collections.defaultdict(float)  # source -> longest time unseen (while tracked)

    def sample() -> dict[str, list[str]]:
        now, at = backends(pg15, sources), time.monotonic()
        doubles.extend((at, s, apps) for s, apps in now.items() if len(apps) > 1)
        for name in now:
            if name in last_seen:
                gaps[name] = max(gaps[name], at - last_seen[name])
            last_seen[name] = at
        return now

    def settled(expected_members: set[str]) -> bool:
        now = sample()
        return (len(now) == len(sources) and all(len(a) == 1 for a in now.values())
                and {a[0] for a in now.values()} == {f"reaper:{m}" for m in expected_members})

    def sampled_wait(predicate: Callable[[], bool], limit: float, what: str) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > limit:
                raise AssertionError(f"timed out after {limit:g}s waiting for {what}; now: "
                                     f"{collections.Counter(a[0] for a in sample().values() if a)}")
            time.sleep(0.5)
        return time.monotonic() - start

    try:
        for m in members:
            m.start()
        # every member joined: each one's status lists 3 live members
        wait_until(lambda: all((st := m.status()) is not None and st.fleet is not None and len(st.fleet.members) == 3
                               for m in members), 30, "three members in every status")
        took = sampled_wait(lambda: settled({"m1", "m2", "m3"}), 2 * REFRESH + 1, "one collector per source")
        owners = collections.Counter(apps[0] for apps in sample().values())
        assert all(17 <= owners[f"reaper:{m.name}"] <= 23 for m in members), owners
        assert took <= 2 * REFRESH + 1
        # the status shows each member with the sources it owns
        wait_until(lambda: (st := members[0].status()) is not None and st.fleet is not None
                   and sum(len(x.sources) for x in st.fleet.members) == 60, 3 * REFRESH, "owned sources in status")
        st = members[0].status()
        assert {x.name for x in st.fleet.members} == {"m1", "m2", "m3"}

        victim = members[2]
        victims_sources = {s for s, apps in sample().items() if apps == ["reaper:m3"]}
        assert victim.proc is not None
        victim.proc.kill()  # kill -9
        victim.proc.wait()
        took = sampled_wait(lambda: settled({"m1", "m2"}), 2 * REFRESH + 1, "the survivors collecting all 60")
        assert took <= 2 * REFRESH + 1
        now = sample()
        assert {now[s][0] for s in victims_sources} == {"reaper:m1", "reaper:m2"}  # spread over both
        owners = collections.Counter(apps[0] for apps in now.values())
        assert owners["reaper:m1"] + owners["reaper:m2"] == 60

        # a fourth member joins: sources move to it, none collected twice, none unseen for more than a
        # refresh + a tick (+ the 0.5 s sampling and a connect)
        last_seen.clear()
        gaps.clear()
        newcomer = Member(tmp_path, "m4", config_text)
        members.append(newcomer)
        newcomer.start()
        sampled_wait(lambda: settled({"m1", "m2", "m4"}), 3 * REFRESH + 10, "the fourth member collecting its share")
        owners = collections.Counter(apps[0] for apps in sample().values())
        assert all(17 <= owners[f"reaper:{m}"] <= 23 for m in ("m1", "m2", "m4")), owners
        assert max(gaps.values()) <= REFRESH + 1.0 + 1.0, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]

        # drain: SIGUSR1 releases every source of m4, which stays up; the others take them
        assert newcomer.proc is not None
        newcomer.proc.send_signal(signal.SIGUSR1)
        sampled_wait(lambda: settled({"m1", "m2"}), 2 * REFRESH + 1, "the drained member's sources taken over")
        assert newcomer.proc.poll() is None
        wait_until(lambda: (st := newcomer.status()) is not None and st.fleet is not None and st.fleet.leaving,
                   10, "the drained member's status")
        assert doubles == [], f"sources collected twice at once: {doubles[:5]}"
    finally:
        for m in members:
            m.stop()
    for m in members[:2] + members[3:]:
        text = m.log.read_text()
        assert "Traceback" not in text, text[-3000:]


def test_a_restarted_coordination_database_stops_collection_within_a_refresh_and_it_resumes(
        pg15, fleet_setup, fresh_db, tmp_path) -> None:
    """Issue 17: the coordination database restarted: members stop collecting within one refresh (nobody can
    know who owns what), resume after it returns, and no source is ever collected twice."""
    from pgserver import PgServer

    config_text, sources = fleet_setup
    with PgServer.create(major=15) as coordination:
        text = config_text.replace(f'dsn = "{pg15.dsn(dbname=fresh_db)}"', f'dsn = "{coordination.dsn()}"', 1)
        assert text != config_text
        members = [Member(tmp_path, f"c{i}", text) for i in range(1, 3)]
        doubles: list[tuple[str, list[str]]] = []

        def sample() -> dict[str, list[str]]:
            now = backends(pg15, sources)
            doubles.extend((s, apps) for s, apps in now.items() if len(apps) > 1)
            return now

        def sampled_wait(predicate: Callable[[], bool], limit: float, what: str) -> float:
            start = time.monotonic()
            while not predicate():
                if time.monotonic() - start > limit:
                    raise AssertionError(f"timed out after {limit:g}s waiting for {what}")
                time.sleep(0.5)
            return time.monotonic() - start

        def all_collected_once() -> bool:
            now = sample()
            return len(now) == len(sources) and all(len(a) == 1 for a in now.values())

        try:
            for m in members:
                m.start()
            sampled_wait(all_collected_once, 30, "one collector per source")
            coordination.stop()
            # a lost session is noticed within half a refresh; stopping 60 sources takes a moment more
            took = sampled_wait(lambda: sample() == {}, 2 * REFRESH + 2, "every member to stop collecting")
            assert took <= 2 * REFRESH + 2
            assert all(m.proc is not None and m.proc.poll() is None for m in members)  # they stay up
            coordination.start()
            sampled_wait(all_collected_once, 6 * REFRESH + 10, "collection to resume after the restart")
            assert doubles == [], f"sources collected twice at once: {doubles[:5]}"
        finally:
            for m in members:
                m.stop()
        for m in members:
            assert "Traceback" not in m.log.read_text(), m.log.read_text()[-3000:]
