"""A fleet whose sources come from a config database (issue 17): two real `reaper run` members read the
same `pgwatch.source` table (made by `reaper config-db init` on PostgreSQL 15, which is also their
coordination database); rows are added, changed (a preset), disabled and removed with psql, and each
edit takes effect within one refresh on the member that owns the source only: who collects what is
sampled from pg_stat_activity (every connection is tagged `reaper:<member>`) and from each member's
output, all along."""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import quote_ident
from test_daemon import Daemon, wait_until
from test_sources_from import add_source, init_config_db

pytestmark = pytest.mark.pg
FEED_REFRESH = 1.0  # [[sources_from]] refresh_seconds (its minimum)
FLEET_REFRESH = 1.0  # [fleet] refresh_seconds
# one refresh of each (a member sees the row, then claims or releases its lock) + a tick and a connect
WITHIN = FEED_REFRESH + FLEET_REFRESH + 2.0
SOURCES = 6  # s0..s3 at the start, s4 added, s5 never inserted (spare)


class Sampler(threading.Thread):
    """Samples pg_stat_activity every 0.2 s: which members have a connection to each source's database."""

    def __init__(self, pg15, databases: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.pg15, self.source_of = pg15, databases
        self.samples: list[tuple[float, dict[str, list[str]]]] = []
        self.halt = threading.Event()

    def sample(self) -> dict[str, list[str]]:
        rows = self.pg15.psql("select datname, application_name from pg_stat_activity "
                              "where application_name like 'reaper:%'")
        now: dict[str, list[str]] = collections.defaultdict(list)
        for line in rows.splitlines():
            db, app = line.split("|", 1)
            if db in self.source_of:
                now[self.source_of[db]].append(app.removeprefix("reaper:"))
        return dict(now)

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append((time.monotonic(), self.sample()))
            self.halt.wait(0.2)

    def collectors(self, source: str, since: float, until: float = float("inf")) -> set[str]:
        """Every member seen collecting the source in that time."""
        return {m for at, now in list(self.samples) if since <= at <= until for m in now.get(source, ())}

    def doubles(self) -> list[tuple[float, str, list[str]]]:
        return [(at, s, apps) for at, now in list(self.samples) for s, apps in now.items() if len(apps) > 1]


@pytest.fixture
def dbs(pg15) -> Iterator[list[str]]:
    """The config (and coordination) database, then one monitored database per source."""
    tag = uuid.uuid4().hex[:8]
    names = [f"t_fcfg_{tag}", *(f"t_fsrc_{i}_{tag}" for i in range(SOURCES))]
    for n in names:
        pg15.psql(f"create database {quote_ident(n)}")
    yield names
    for n in names:
        pg15.psql(f"drop database if exists {quote_ident(n)} with (force)")


def test_pgwatch_source_edits_take_effect_within_a_refresh_on_the_owning_member_only(
        pg15, dbs: list[str], tmp_path: Path) -> None:
    cfg, *monitored = dbs
    init_config_db(pg15, cfg)
    pg15.psql("insert into pgwatch.preset (name, description, metrics) values "
              "('fast', 'ping and kpi', '{\"ping\": 1, \"kpi\": 1}')", dbname=cfg)
    db_of = {f"s{i}": db for i, db in enumerate(monitored)}
    for i in range(4):
        add_source(pg15, cfg, f"s{i}", db_of[f"s{i}"])
    members: dict[str, Daemon] = {}
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        d = members[name] = Daemon(tmp_path / name)
        d.write_config([], extra=f'\n[[sources_from]]\ndsn = "{pg15.dsn(dbname=cfg)}"\n'
                                 f'refresh_seconds = {FEED_REFRESH}\n'
                                 f'\n[fleet]\ndsn = "{pg15.dsn(dbname=cfg)}"\nmember = "{name}"\n'
                                 f'refresh_seconds = {FLEET_REFRESH}\n'
                                 # reaper reads presets from its own catalogue and config, not pgwatch.preset
                                 '\n[presets.fast]\ndescription = "ping and kpi"\nmetrics = { ping = 1, kpi = 1 }\n')
    sampler = Sampler(pg15, {db: s for s, db in db_of.items()})

    def owner(source: str) -> str | None:
        apps = sampler.sample().get(source, [])
        return apps[0] if len(apps) == 1 else None

    def other(member: str) -> str:
        return "m2" if member == "m1" else "m1"

    def lines(member: str, source: str, metric: str | None = None) -> list[dict]:
        return [x for x in members[member].lines()
                if x["dbname"] == source and (metric is None or x["metric"] == metric)]

    try:
        sampler.start()
        for d in members.values():
            d.start()
        # both members collect: each of the four rows by exactly one of them
        wait_until(lambda: (now := sampler.sample()).keys() == {"s0", "s1", "s2", "s3"}
                   and all(len(a) == 1 for a in now.values()) and {a[0] for a in now.values()} == {"m1", "m2"},
                   limit=20, what="the four rows shared by both members")

        # add a row: one member collects it within a refresh, the other never
        added = time.monotonic()
        add_source(pg15, cfg, "s4", db_of["s4"])
        wait_until(lambda: owner("s4") is not None and lines(owner("s4") or "", "s4"), limit=WITHIN + 1,
                   what="the added row collected")
        assert time.monotonic() - added <= WITHIN + 1
        new_owner = owner("s4")
        assert new_owner is not None

        # change a preset: the owner collects the new metric on the same connection; the other member
        # neither connects to that source nor collects it
        wait_until(lambda: all(owner(f"s{i}") is not None for i in range(5)), limit=WITHIN, what="settled")
        changed, owner_p = "s0", owner("s0")
        assert owner_p is not None
        pid = pg15.psql(f"select pid from pg_stat_activity where datname = '{db_of[changed]}' "
                        f"and application_name = 'reaper:{owner_p}'")
        edited = time.monotonic()
        pg15.psql(f"update pgwatch.source set config = null, preset_config = 'fast' where name = '{changed}'",
                  dbname=cfg)
        wait_until(lambda: lines(owner_p, changed, "kpi"), limit=WITHIN, what="the new preset's metric")
        assert time.monotonic() - edited <= WITHIN
        assert pg15.psql(f"select pid from pg_stat_activity where datname = '{db_of[changed]}' "
                         f"and application_name like 'reaper:%'") == pid  # changed in place
        assert sampler.collectors(changed, edited) == {owner_p}
        assert not lines(other(owner_p), changed, "kpi")

        # disable one row and remove another: the owner stops it within a refresh, the other never starts it
        disabled, removed = "s1", "s2"
        owners = {s: owner(s) for s in (disabled, removed)}
        assert None not in owners.values()
        edited = time.monotonic()
        pg15.psql(f"update pgwatch.source set is_enabled = false where name = '{disabled}';"
                  f"delete from pgwatch.source where name = '{removed}'", dbname=cfg)
        wait_until(lambda: not {disabled, removed} & sampler.sample().keys(), limit=WITHIN,
                   what="the disabled and removed rows stopped")
        assert time.monotonic() - edited <= WITHIN
        stopped = time.monotonic()
        for s, o in owners.items():
            assert sampler.collectors(s, edited) <= {o}, (s, sampler.collectors(s, edited))
        counts = {m: {s: len(lines(m, s)) for s in (disabled, removed)} for m in members}

        # a while later: still nobody collects them; the unchanged sources go on, once each
        wait_until(lambda: len(sampler.samples) > 0 and sampler.samples[-1][0] > stopped + 2 * FLEET_REFRESH + 1,
                   limit=10, what="more samples")
        assert not sampler.collectors(disabled, stopped) and not sampler.collectors(removed, stopped)
        assert {m: {s: len(lines(m, s)) for s in (disabled, removed)} for m in members} == counts
        now = sampler.sample()
        assert now.keys() == {"s0", "s3", "s4"} and all(len(a) == 1 for a in now.values()), now
        assert sampler.doubles() == [], sampler.doubles()[:5]
        # the added row was collected by one member only until the removals (which may move other rows)
        assert sampler.collectors("s4", added, edited) == {new_owner}
        assert not lines(other(new_owner), "s4") or sampler.collectors("s4", edited) == {"m1", "m2"}
        for d in members.values():
            assert d.stop() == 0
            assert "Traceback" not in d.log_text(), d.log_text()[-3000:]
    finally:
        sampler.halt.set()
        sampler.join(timeout=10)
        for d in members.values():
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
