"""The benchmark's PostgreSQL: a throwaway server, its databases, roles and a light workload."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Any

import asyncpg
from pgserver import PgServer, create_monitoring_role, quote_ident

log = logging.getLogger("bench.lab")

REAPER_ROLE = "reaper_mon"  # reaper's login: pg_monitor + CONNECT, nothing else
PEER_ROLE = "pgexp"  # the peer exporter's login: the same privileges
TEMPLATE_DB = "bench_tpl"
EXTENSIONS = ("pg_stat_statements", "pg_buffercache", "pgstattuple")

# A small pgbench-like schema (own SQL), plus a function and a view so function and object metrics have rows.
SCHEMA_SQL = """
create table branches (bid int primary key, bbalance int not null default 0, filler char(88));
create table tellers (tid int primary key, bid int not null references branches, tbalance int not null default 0,
                      filler char(84));
create table accounts (aid int primary key, bid int not null references branches, abalance int not null default 0,
                       filler char(84));
create table history (hid bigserial primary key, tid int, bid int, aid int, delta int,
                      mtime timestamptz not null default now(), filler char(22));
create index accounts_bid on accounts (bid);
create index history_mtime on history (mtime);
insert into branches (bid) select g from generate_series(1, 4) g;
insert into tellers (tid, bid) select g, 1 + g % 4 from generate_series(1, 40) g;
insert into accounts (aid, bid) select g, 1 + g % 4 from generate_series(1, 20000) g;
create function account_balance(a int) returns int language sql stable
    as 'select abalance from accounts where aid = a';
create view branch_totals as select bid, sum(abalance) as total from accounts group by bid;
analyze;
"""

# Distinct statement shapes, so pg_stat_statements has a realistic number of entries per database.
READ_SHAPES = [
    "select count(*) from accounts where bid = $1",
    "select sum(abalance) from accounts where aid between $1 and $1 + 100",
    "select * from branch_totals where bid = $1",
    "select t.tid, t.tbalance from tellers t join branches b using (bid) where b.bid = $1",
    "select max(mtime) from history where bid = $1",
    "select aid from accounts where abalance > $1 order by abalance desc limit 5",
    "select count(*) from history where aid % 7 = $1 % 7",
    "select avg(abalance)::int from accounts where bid = $1 and aid < 1000",
    "select bid, count(*) from tellers where bid <= $1 group by bid",
    "select exists(select 1 from accounts where aid = $1)",
]


def database_names(count: int) -> list[str]:
    return [f"bench{i:03d}" for i in range(1, count + 1)]


def start_server(max_connections: int) -> PgServer:
    settings = {
        "max_connections": str(max_connections),
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.max": "10000",
        "pg_stat_statements.track": "top",
        "pg_stat_statements.track_utility": "on",
        "shared_buffers": "256MB",
        "autovacuum_naptime": "20s",
        "log_min_messages": "warning",
    }
    return PgServer.create(major=15, settings=settings)


def prepare(server: PgServer, databases: list[str]) -> None:
    """Template database with schema, data and extensions; N copies of it; the two monitoring roles."""
    t0 = time.monotonic()
    server.psql(f"create database {quote_ident(TEMPLATE_DB)}")
    server.psql("".join(f"create extension if not exists {quote_ident(e)};\n" for e in EXTENSIONS) + SCHEMA_SQL,
                dbname=TEMPLATE_DB)
    server.psql(f"update pg_database set datistemplate = true where datname = '{TEMPLATE_DB}'")
    # CREATE DATABASE cannot run in a transaction block; psql -f runs each statement on its own
    for start in range(0, len(databases), 50):
        chunk = databases[start:start + 50]
        server.psql("".join(f"create database {quote_ident(d)} template {quote_ident(TEMPLATE_DB)};\n"
                            for d in chunk))
    server.psql("create extension if not exists pg_stat_statements", dbname="postgres")
    for role in (REAPER_ROLE, PEER_ROLE):
        create_monitoring_role(server, role)
    grants = "".join(f"grant connect on database {quote_ident(d)} to {REAPER_ROLE}, {PEER_ROLE};\n"
                     for d in databases)
    server.psql(grants)
    log.info("prepared %d databases in %.1fs", len(databases), time.monotonic() - t0)


def reset_statements(server: PgServer) -> None:
    server.psql("select pg_stat_statements_reset()")


def statements_of(server: PgServer, role: str) -> list[dict[str, Any]]:
    """pg_stat_statements entries of a role, summed over databases (same text = one entry)."""
    sql = f"""
        select json_agg(x) from (
            select s.query, sum(s.calls)::int8 as calls, sum(s.rows)::int8 as rows,
                   sum(s.total_exec_time)::float8 as exec_ms, max(s.max_exec_time)::float8 as max_ms
            from pg_stat_statements s join pg_roles r on r.oid = s.userid
            where r.rolname = '{role}'
            group by s.query order by 2 desc) x
    """
    import json

    out = server.psql(sql)
    return json.loads(out) if out else []


def backend_pids(server: PgServer, role: str) -> list[int]:
    out = server.psql(f"select pid from pg_stat_activity where usename = '{role}'")
    return [int(p) for p in out.split()] if out else []


class Workload:
    """A light pgbench-like workload in a background thread (its own asyncio loop and connections)."""

    def __init__(self, server: PgServer, databases: list[str], rate: float, max_connections: int = 40) -> None:
        self.server = server
        self.databases = databases[:max_connections]
        self.rate = rate
        self.transactions = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bench-workload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception:
            log.exception("workload stopped with an error")

    async def _run(self) -> None:
        conns = []
        try:
            for d in self.databases:
                conns.append(await asyncpg.connect(self.server.dsn(dbname=d),
                                                   server_settings={"application_name": "bench-workload"}))
            rng = random.Random(7)
            period = 1.0 / self.rate if self.rate > 0 else 1.0
            nxt = time.monotonic()
            i = 0
            while not self._stop.is_set():
                conn = conns[i % len(conns)]
                i += 1
                try:
                    aid, tid, bid = rng.randint(1, 20000), rng.randint(1, 40), rng.randint(1, 4)
                    async with conn.transaction():
                        delta = rng.randint(-5000, 5000)
                        await conn.execute("update accounts set abalance = abalance + $1 where aid = $2", delta, aid)
                        await conn.fetchval("select account_balance($1)", aid)
                        await conn.execute("update tellers set tbalance = tbalance + $1 where tid = $2", delta, tid)
                        await conn.execute("update branches set bbalance = bbalance + $1 where bid = $2", delta, bid)
                        await conn.execute("insert into history (tid, bid, aid, delta) values ($1, $2, $3, $4)",
                                           tid, bid, aid, delta)
                    await conn.fetch(rng.choice(READ_SHAPES), rng.randint(1, 4))
                    if i % 500 == 0:
                        await conn.execute("delete from history where mtime < now() - interval '2 minutes'")
                    self.transactions += 1
                except (asyncpg.PostgresError, OSError):
                    self.errors += 1
                nxt += period
                delay = nxt - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    nxt = time.monotonic()
        finally:
            for c in conns:
                c.terminate()
