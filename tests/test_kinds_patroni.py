"""kind = "patroni": cluster members read from a real etcd (Debian's etcd-server), keys laid out as
Patroni writes them: `/<namespace>/<scope>/members/<member>` (JSON with conn_url, role, state...),
`/<namespace>/<scope>/leader` (the leader's name), plus the scope's other keys, which are ignored."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import trio_asyncio
from kinds_programs import Etcd, Program, require_program, start_patroni
from pgserver import ServerHandle, find_bindir

from reaper import db
from reaper.config.schema import SourceConfig
from reaper.errors import SourceUnavailable
from reaper.kinds import check_source, is_discovery, resolve
from reaper.kinds.dsn import with_parameters
from reaper.kinds.patroni import EtcdTarget, PatroniMember, parse_etcd_dsn, patroni_children


@pytest.fixture
def etcd() -> Iterator[Etcd]:
    server = Etcd()
    server.run()
    yield server
    server.stop()


def member_json(conn_url: str, role: str, state: str = "running") -> str:
    """A member value as Patroni 3.x writes it."""
    return json.dumps({"conn_url": conn_url, "api_url": conn_url.replace("postgres://", "http://") + "/patroni",
                       "state": state, "role": role, "version": "3.3.2", "xlog_location": 50331968,
                       "timeline": 1})


def write_cluster(etcd: Etcd, scope: str, members: dict[str, tuple[str, str]], leader: str,
                  namespace: str = "service") -> None:
    base = f"/{namespace}/{scope}"
    etcd.put(f"{base}/config", json.dumps({"ttl": 30, "loop_wait": 10, "postgresql": {"use_pg_rewind": True}}))
    etcd.put(f"{base}/initialize", "7301234567890123456")
    etcd.put(f"{base}/status", json.dumps({"optime": 50331968, "slots": {}}))
    etcd.put(f"{base}/history", "[]")
    etcd.put(f"{base}/leader", leader)
    for name, (conn_url, role) in members.items():
        etcd.put(f"{base}/members/{name}", member_json(conn_url, role))


def patroni_source(etcd: Etcd, path: str = "/service/batman", **kwargs: object) -> SourceConfig:
    hosts = f"127.0.0.1:1,127.0.0.1:{etcd.port}"  # the first host is down: the next one is tried
    base = {"name": "pat", "dsn": f"etcd://{hosts}{path}", "kind": "patroni", "preset": "basic",
            "tags": {"cluster": "batman"}, "connect_timeout_seconds": 2.0}
    return SourceConfig(**{**base, **kwargs})  # type: ignore[arg-type]


async def test_members_are_resolved_and_a_failover_is_followed(etcd: Etcd) -> None:
    write_cluster(etcd, "batman", {"pg1": ("postgres://10.0.0.1:5432/postgres", "primary"),
                                   "pg2": ("postgres://10.0.0.2:5432/postgres", "replica")}, leader="pg1")
    write_cluster(etcd, "robin", {"r1": ("postgres://10.0.1.1:5432/postgres", "master")}, leader="r1")
    src = patroni_source(etcd)
    primary_only = patroni_source(etcd, only_if_primary=True)
    assert is_discovery(src) and check_source(src) == []
    children = await resolve(src)
    assert [(c.name, c.dsn, c.kind) for c in children] == [
        ("pat_pg1", "postgres://10.0.0.1:5432/postgres", "postgres"),
        ("pat_pg2", "postgres://10.0.0.2:5432/postgres", "postgres")]
    assert all(c.preset == "basic" and c.tags == {"cluster": "batman"} for c in children)
    assert [c.name for c in await resolve(primary_only)] == ["pat_pg1"]

    # failover: pg2 is promoted, pg1 comes back as a replica, a third member joins
    etcd.put("/service/batman/leader", "pg2")
    etcd.put("/service/batman/members/pg1", member_json("postgres://10.0.0.1:5432/postgres", "replica"))
    etcd.put("/service/batman/members/pg2", member_json("postgres://10.0.0.2:5432/postgres", "primary"))
    etcd.put("/service/batman/members/pg3", member_json("postgres://10.0.0.3:5432/postgres", "replica"))
    assert [c.name for c in await resolve(src)] == ["pat_pg1", "pat_pg2", "pat_pg3"]
    [leader] = await resolve(primary_only)
    assert (leader.name, leader.dsn, leader.only_if_primary) == ("pat_pg2", "postgres://10.0.0.2:5432/postgres", True)

    # a member leaves (its key expires)
    etcd.delete("/service/batman/members/pg1")
    assert [c.name for c in await resolve(src)] == ["pat_pg2", "pat_pg3"]

    # no scope: every scope of the namespace, the scope in the child's name
    everyone = await resolve(patroni_source(etcd, path="/service"))
    assert [c.name for c in everyone] == ["pat_batman_pg2", "pat_batman_pg3", "pat_robin_r1"]
    assert [c.name for c in await resolve(patroni_source(etcd, path="", only_if_primary=True))] == [
        "pat_batman_pg2", "pat_robin_r1"]
    assert await resolve(patroni_source(etcd, path="/service/nosuchscope")) == []


async def test_etcd_down_is_source_unavailable(etcd: Etcd) -> None:
    write_cluster(etcd, "batman", {"pg1": ("postgres://10.0.0.1:5432/postgres", "primary")}, leader="pg1")
    src = patroni_source(etcd)
    assert len(await resolve(src)) == 1
    etcd.stop(remove=False)
    with pytest.raises(SourceUnavailable, match=r"etcd: http://127\.0\.0\.1:1: .*; http://127\.0\.0\.1:\d+: "):
        await resolve(src)
    with pytest.raises(SourceUnavailable, match="dsn"):
        await resolve(SourceConfig(name="x", dsn="consul://h/service/x", kind="patroni"))


async def test_member_dsn_gets_the_source_credentials_and_connects(etcd: Etcd, pg15: ServerHandle) -> None:
    # Patroni's conn_url has no user: the dsn's parameters supply it (and the database to monitor)
    write_cluster(etcd, "batman", {"pg1": (f"postgres://127.0.0.1:{pg15.port}/postgres", "primary")}, leader="pg1")
    src = patroni_source(etcd, path="/service/batman?user=postgres&dbname=template1&sslmode=disable")
    [child] = await resolve(src)
    assert child.dsn == f"postgres://postgres@127.0.0.1:{pg15.port}/template1?sslmode=disable"
    async with trio_asyncio.open_loop():
        conn = await db.open_source_connection(child.dsn, statement_timeout_seconds=5)
        assert conn.server.database == "template1" and not conn.server.in_recovery
        await conn.close()


def enable_auth(etcd: Etcd) -> None:
    """With etcdctl: a root user, a user `reader` that may read /service/, then authentication on."""
    etcdctl = require_program("etcdctl", "etcd-client")
    env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
    for args in (["user", "add", "root:rootpw"], ["user", "add", "reader:s3cr%t"], ["role", "add", "patroni-read"],
                 ["role", "grant-permission", "patroni-read", "--prefix=true", "read", "/service/"],
                 ["user", "grant-role", "reader", "patroni-read"], ["auth", "enable"]):
        subprocess.run([etcdctl, f"--endpoints={etcd.url}", *args], check=True, capture_output=True, env=env,
                       timeout=30)


async def test_patterns_discover_each_members_databases(etcd: Etcd, pg15: ServerHandle,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    stem = f"kp_{uuid.uuid4().hex[:8]}_"
    for suffix in ("a", "b"):
        pg15.psql(f"CREATE DATABASE {stem}{suffix}")
    try:
        write_cluster(etcd, "batman", {"pg1": (f"postgres://127.0.0.1:{pg15.port}/postgres", "primary"),
                                       "pg2": ("postgres://127.0.0.1:1/postgres", "replica")}, leader="pg1")
        src = patroni_source(etcd, path="/service/batman?user=postgres", include_pattern=f"^{stem}",
                             exclude_pattern="b$")
        async with trio_asyncio.open_loop():
            children = await resolve(src)
    finally:
        for suffix in ("a", "b"):
            pg15.psql(f"DROP DATABASE {stem}{suffix} WITH (FORCE)")
    # pgwatch's names; pg2 is down: left out of this refresh, logged, the rest still resolved
    assert [(c.name, c.dsn, c.kind) for c in children] == [
        (f"pat_pg1_{stem}a", f"postgres://postgres@127.0.0.1:{pg15.port}/{stem}a", "postgres")]
    assert "member pat_pg2 left out" in caplog.text


async def test_etcd_with_authentication(etcd: Etcd) -> None:
    write_cluster(etcd, "batman", {"pg1": ("postgres://10.0.0.1:5432/postgres", "primary")}, leader="pg1")
    enable_auth(etcd)
    ok = patroni_source(etcd, dsn=f"etcd://reader:s3cr%25t@127.0.0.1:{etcd.port}/service/batman")
    assert [c.name for c in await resolve(ok)] == ["pat_pg1"]
    with pytest.raises(SourceUnavailable, match="authentication failed"):
        await resolve(patroni_source(etcd, dsn=f"etcd://reader:wrong@127.0.0.1:{etcd.port}/service/batman"))
    with pytest.raises(SourceUnavailable, match="etcd"):  # anonymous reads are refused now
        await resolve(patroni_source(etcd, dsn=f"etcd://127.0.0.1:{etcd.port}/service/batman"))


def test_parse_etcd_dsn() -> None:
    t = parse_etcd_dsn("etcd://u:p%40w@h1:2379,[::1]:2380,h3/service/batman?ca_file=/ca.pem&user=mon&sslmode=require")
    assert t.endpoints == ("https://h1:2379", "https://[::1]:2380", "https://h3:2379")
    assert (t.namespace, t.scope, t.username, t.password, t.ca_file) == ("service", "batman", "u", "p@w", "/ca.pem")
    assert t.pg_params == {"user": "mon", "sslmode": "require"} and t.prefix == "/service/batman/"
    assert (parse_etcd_dsn("etcd://h").namespace, parse_etcd_dsn("etcd://h").scope) == ("service", None)
    assert parse_etcd_dsn("etcd://h/ns/").scope is None and parse_etcd_dsn("etcd://h/ns").prefix == "/ns/"
    deep = parse_etcd_dsn("etcd://h/a/b/sc")
    assert (deep.namespace, deep.scope) == ("a/b", "sc")
    assert parse_etcd_dsn("etcd://h/a/b/").prefix == "/a/b/"
    # each host on its own (Debian's Python 3.11.2 urlsplit refuses the joined multi-host string)
    assert parse_etcd_dsn("etcd://[fe80::1],h2:2380").endpoints == ("http://[fe80::1]:2379", "http://h2:2380")
    assert parse_etcd_dsn("etcd://[::1]:2379?ca_file=/c").endpoints == ("https://[::1]:2379",)
    assert parse_etcd_dsn("ETCD://h#frag").endpoints == ("http://h:2379",)
    for bad in ("postgresql://h/x", "etcd:///service", "etcd://h:port/x", "etcd://h1,,h2/x", "etcd://[::1,h2/x",
                "etcd://::1/x", "etcd:/h/x"):
        with pytest.raises(ValueError):
            parse_etcd_dsn(bad)
    assert check_source(SourceConfig(name="p", dsn="etcd://h:2379/service/x", kind="patroni")) == []
    assert check_source(SourceConfig(name="p", dsn="postgresql://h/x", kind="patroni"))[0].startswith("dsn:")


def test_children_names_roles_and_credentials() -> None:
    target = EtcdTarget(endpoints=("http://h:2379",), namespace="service", scope="batman",
                        pg_params={"user": "mon", "password": "p w"})
    members = [PatroniMember("batman", "a", "postgres://h1:5432/postgres", "replica", "running", True),
               PatroniMember("batman", "b", "postgres://x:y@h2:5432/postgres?sslmode=require", None, None, False),
               PatroniMember("batman", "c", "postgres://h3:5432/postgres", "standby_leader", "running", False)]
    src = SourceConfig(name="s", dsn="etcd://h/service/batman", kind="patroni", password_file="/pw")
    children = patroni_children(src, target, members)
    assert [(c.name, c.dsn) for c in children] == [
        ("s_a", "postgres://mon:p%20w@h1:5432/postgres"),
        ("s_b", "postgres://x:y@h2:5432/postgres?sslmode=require"),  # its own credentials win
        ("s_c", "postgres://mon:p%20w@h3:5432/postgres")]
    assert all(c.password_file == "/pw" and c.kind == "postgres" for c in children)
    # a role decides; the leader key only for a member without one; standby_leader is no primary
    primary = patroni_children(SourceConfig(name="s", dsn="x", kind="patroni", only_if_primary=True), target, members)
    assert primary == []
    members[1] = PatroniMember("batman", "b", "postgres://h2/postgres", None, None, True)
    assert [c.name for c in patroni_children(
        SourceConfig(name="s", dsn="x", kind="patroni", only_if_primary=True), target, members)] == ["s_b"]
    assert with_parameters("postgres://h/db?a=1", {"a": "2", "b": "3", "dbname": "x"}) == "postgres://h/x?a=1&b=3"


def switchover(member: Program, *, leader: str, candidate: str) -> int:
    """Patroni's REST API: a planned switchover; the HTTP status."""
    request = urllib.request.Request(f"http://127.0.0.1:{member.port}/switchover",
                                     data=json.dumps({"leader": leader, "candidate": candidate}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return int(response.status)


def wait_for_members(etcd: Etcd, scope: str, want: dict[str, str], limit: float = 90.0, *,
                     running_only: bool = True) -> None:
    """Until the (running) members of `scope` and their roles are exactly `want` ({"pg1": "primary"...})."""
    deadline = time.monotonic() + limit
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        prefix = f"/service/{scope}/members/"
        answer = etcd.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + "0")})
        kvs = answer.get("kvs") or []
        assert isinstance(kvs, list)
        seen = {}
        for kv in kvs:
            value = json.loads(base64.b64decode(kv["value"]))
            if value.get("state") == "running" or not running_only:
                role = value.get("role")
                seen[base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]] = (
                    "primary" if role in ("master", "primary") else role)
        if seen == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"members of {scope}: {seen}, want {want}")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_a_real_patroni_cluster_switchover_and_a_member_leaving(etcd: Etcd) -> None:
    """Two real Patroni members (Debian's patroni, PostgreSQL 15): members, roles, a switchover and a
    member that shuts down are all followed by the next resolve."""
    bindir = find_bindir(15)
    members: list[Program] = []
    try:
        members.append(start_patroni(etcd, scope="gotham", name="pg1", bindir=bindir))
        wait_for_members(etcd, "gotham", {"pg1": "primary"})
        members.append(start_patroni(etcd, scope="gotham", name="pg2", bindir=bindir))
        wait_for_members(etcd, "gotham", {"pg1": "primary", "pg2": "replica"})

        src = patroni_source(etcd, path="/service/gotham?user=postgres")
        primary_only = patroni_source(etcd, path="/service/gotham?user=postgres", only_if_primary=True)
        children = await resolve(src)
        assert [c.name for c in children] == ["pat_pg1", "pat_pg2"]
        async with trio_asyncio.open_loop():
            for child, in_recovery in zip(children, (False, True), strict=True):
                conn = await db.open_source_connection(child.dsn, statement_timeout_seconds=5)
                assert conn.server.in_recovery is in_recovery, child.name
                await conn.close()
        assert [c.name for c in await resolve(primary_only)] == ["pat_pg1"]

        assert switchover(members[0], leader="pg1", candidate="pg2") == 200
        wait_for_members(etcd, "gotham", {"pg1": "replica", "pg2": "primary"})
        assert [c.name for c in await resolve(primary_only)] == ["pat_pg2"]

        members[0].terminate()  # Patroni stops PostgreSQL; its member key expires with its lease (ttl)
        wait_for_members(etcd, "gotham", {"pg2": "primary"}, running_only=False)
        assert [c.name for c in await resolve(src)] == ["pat_pg2"]
    finally:
        for prog in reversed(members):
            prog.stop()
