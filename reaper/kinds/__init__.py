"""Source kinds that stand for several servers or databases: turning them into concrete sources.

Pure trio (no asyncio here): `resolve(source)` returns the concrete `postgres` sources a
discovery-type source stands for, now. The caller refreshes every `discovery_interval_seconds`
(and on reload), starts and stops the children's tasks by name, and keeps the last known list when
`resolve` raises SourceUnavailable.

postgres-discovery
    The dsn names one database of an instance; every database that allows connections, is not a
    template, that the role may CONNECT to, matches `include_pattern` and does not match
    `exclude_pattern` becomes a child named `<source>_<datname>` whose dsn is the source's with the
    database replaced (percent-encoded: any database name works). The patterns are PostgreSQL
    regular expressions evaluated by the server (as pgwatch's): see reaper.db.discovery.

patroni
    `dsn = "etcd://[user:password@]host1:2379,host2:2379/<namespace>[/<scope>][?params]"`. The
    members of a Patroni cluster are read from etcd v3, where Patroni keeps one key per member,
    `/<namespace>/<scope>/members/<member>`, whose value is JSON with `conn_url`, `role`, `state`,
    `api_url`... (and `/<namespace>/<scope>/leader` holds the leader's name). They are read through
    etcd's v3 JSON gateway (`POST /v3/kv/range`, keys base64-encoded; etcd 3.4+), trying the hosts in
    turn. Each member becomes a child named `<source>_<member>` (`<source>_<scope>_<member>` when
    the dsn names no scope: then every scope of the namespace is read) whose dsn is the member's
    `conn_url`. `only_if_primary` keeps only the member whose role is primary (`primary`, `master`;
    the leader key decides for members without a role) and is passed on to the child, so a child
    that is demoted stops collecting at its next tick even before the next refresh. Members are
    kept whatever their `state` (a stopped member shows as down) until Patroni's key expires.

    With `include_pattern` or `exclude_pattern` set, each member is instead discovered like
    postgres-discovery: its databases become children named `<source>[_<scope>]_<member>_<datname>`
    (pgwatch's names); a member whose listing fails is left out of that refresh (logged).

    The path: `/service/batman` = namespace `service`, scope `batman`; `/service` or `/service/` =
    every scope of namespace `service`; no path = namespace `service` (Patroni's default), every
    scope. A namespace of several segments needs the scope (`/a/b/batman`) or a trailing slash
    (`/a/b/` = every scope).

    The userinfo authenticates to etcd (as pgwatch's does): `POST /v3/auth/authenticate`, the
    token then goes in the Authorization header. Parameters: `ca_file`, `cert_file`, `key_file`
    switch to HTTPS with that CA and client certificate (as in pgwatch's patroni dsn); every other
    parameter is a libpq connection parameter added to each member's dsn where the member's
    conn_url lacks it: `user`, `password` (Patroni's conn_url carries no credentials), `sslmode`...,
    and `dbname` replaces the database of every member (Patroni's conn_url names `postgres`). The
    source's `password_file` is inherited by the children.

Every child inherits the rest of the source: preset, metrics, standby preset/metrics, tags, group,
timeouts, password_file, only_if_primary.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import attrs
import httpx
import trio

from reaper.config.schema import SourceConfig
from reaper.db.discovery import list_databases
from reaper.errors import SourceUnavailable

log = logging.getLogger("reaper.kinds")

DISCOVERY_KINDS = frozenset({"postgres-discovery", "patroni"})
POOLER_KINDS = frozenset({"pgbouncer", "pgpool"})
PRIMARY_ROLES = frozenset({"primary", "master"})
DEFAULT_NAMESPACE = "service"
ETCD_TLS_PARAMS = frozenset({"ca_file", "cert_file", "key_file"})
RESOLVE_GRACE_SECONDS = 5.0


def is_discovery(source: SourceConfig) -> bool:
    """True for kinds that `resolve` expands into children (their own task never collects)."""
    return source.kind in DISCOVERY_KINDS


async def resolve(source: SourceConfig) -> list[SourceConfig]:
    """The concrete sources `source` stands for now (itself, for a concrete kind), sorted by name.

    Raises SourceUnavailable when the list cannot be had (the caller keeps its last known list).
    The whole call is bounded by the source's connect + query timeouts (plus a little grace).
    """
    if source.kind == "postgres-discovery":
        return await _discover(source)
    if source.kind == "patroni":
        try:
            target = parse_etcd_dsn(source.dsn)
        except ValueError as e:
            raise SourceUnavailable(f"dsn: {e}") from e
        members = await read_etcd_members(target, request_seconds=source.connect_timeout_seconds)
        children = patroni_children(source, target, members)
        if not (_has_pattern(source.include_pattern) or _has_pattern(source.exclude_pattern)):
            return children
        return await _discover_members(source, children)
    return [source]


def _has_pattern(pattern: str | None) -> bool:
    return bool(pattern and pattern.strip())


async def _discover(source: SourceConfig) -> list[SourceConfig]:
    deadline = source.connect_timeout_seconds + source.query_timeout_seconds + RESOLVE_GRACE_SECONDS
    try:
        with trio.fail_after(deadline):
            names = await list_databases(
                source.dsn, include_pattern=source.include_pattern, exclude_pattern=source.exclude_pattern,
                password_file=source.password_file, statement_timeout_seconds=source.query_timeout_seconds)
    except trio.TooSlowError:
        raise SourceUnavailable(f"listing databases timed out after {deadline:g}s") from None
    return sorted((database_child(source, name) for name in names), key=lambda s: s.name)


async def _discover_members(source: SourceConfig, members: list[SourceConfig]) -> list[SourceConfig]:
    """A patroni source with include/exclude patterns: each member's databases, as pgwatch does
    (`<source>[_<scope>]_<member>_<datname>`). A member whose listing fails is left out (logged):
    during a failover one member is often down, and the others must still be followed."""
    found: dict[str, list[SourceConfig]] = {}

    async def one(member: SourceConfig) -> None:
        as_discovery = attrs.evolve(member, kind="postgres-discovery", include_pattern=source.include_pattern,
                                    exclude_pattern=source.exclude_pattern)
        try:
            found[member.name] = await _discover(as_discovery)
        except SourceUnavailable as e:
            log.warning("source %s: member %s left out of this refresh: %s", source.name, member.name, e)

    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(one, member)
    return sorted((child for children in found.values() for child in children), key=lambda s: s.name)


def check_source(source: SourceConfig) -> list[str]:
    """Kind-specific problems with a source's settings, as `key: what is wrong` lines (for `check`)."""
    problems = []
    if source.kind == "patroni":
        try:
            parse_etcd_dsn(source.dsn)
        except ValueError as e:
            problems.append(f"dsn: {e}")
    elif not re.match(r"^postgres(ql)?://", source.dsn):
        problems.append("dsn: expected a URI starting with postgresql://")
    if source.kind in DISCOVERY_KINDS and source.discovery_interval_seconds <= 0:
        problems.append("discovery_interval_seconds: must be more than 0")
    if source.kind not in DISCOVERY_KINDS:
        for key in ("include_pattern", "exclude_pattern"):
            if getattr(source, key):
                problems.append(f"{key}: only used by kinds postgres-discovery and patroni")
    return problems


# ---------------------------------------------------------------------------------------------
# dsn surgery


def with_database(dsn: str, dbname: str) -> str:
    """The dsn with its database replaced; a URI keeps everything else (a `dbname`/`database`
    parameter is dropped, the path carries the percent-encoded name); key=value form works too."""
    if re.match(r"^postgres(ql)?://", dsn):
        parts = urlsplit(dsn)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("dbname", "database")]
        return urlunsplit((parts.scheme, parts.netloc, "/" + quote(dbname, safe=""),
                           urlencode(query, quote_via=quote), parts.fragment))
    value = "'" + dbname.replace("\\", "\\\\").replace("'", "\\'") + "'"
    pattern = re.compile(r"(^|\s)dbname\s*=\s*('(?:[^'\\]|\\.)*'|\S*)")
    if pattern.search(dsn):
        return pattern.sub(lambda m: f"{m.group(1)}dbname={value}", dsn, count=1)
    return f"{dsn} dbname={value}".strip()


def with_parameters(dsn: str, params: Mapping[str, str]) -> str:
    """A URI dsn with libpq parameters added where it lacks them (`user`/`password` go into the
    userinfo, `dbname` replaces the database)."""
    params = dict(params)
    dbname = params.pop("dbname", None) or params.pop("database", None)
    if dbname is not None:
        dsn = with_database(dsn, dbname)
    parts = urlsplit(dsn)
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    user_param, password_param = params.pop("user", None), params.pop("password", None)
    if not user and user_param:
        user = quote(user_param, safe="")
    if not colon and password_param is not None and user:
        colon, password = ":", quote(password_param, safe="")
    netloc = f"{user}{colon}{password}@{hostinfo}" if user else hostinfo
    query = parse_qsl(parts.query, keep_blank_values=True)
    present = {k for k, _ in query}
    query += [(k, v) for k, v in params.items() if k not in present]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, quote_via=quote), parts.fragment))


def database_child(source: SourceConfig, dbname: str) -> SourceConfig:
    """One discovered database as a concrete source."""
    return attrs.evolve(source, name=f"{source.name}_{dbname}", dsn=with_database(source.dsn, dbname),
                        kind="postgres", include_pattern=None, exclude_pattern=None)


# ---------------------------------------------------------------------------------------------
# Patroni in etcd v3


@attrs.frozen
class EtcdTarget:
    endpoints: tuple[str, ...]  # base URLs, http://host:port
    namespace: str  # without slashes at either end: "service", "a/b"
    scope: str | None  # None: every scope in the namespace
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    pg_params: dict[str, str] = attrs.field(factory=dict, repr=False)  # libpq parameters for the members

    @property
    def prefix(self) -> str:
        """The key prefix read: the scope's keys, or the whole namespace's."""
        scope = f"{self.scope}/" if self.scope else ""
        return f"/{self.namespace}/{scope}"


@attrs.frozen
class PatroniMember:
    scope: str
    name: str
    conn_url: str
    role: str | None
    state: str | None
    is_leader: bool

    @property
    def is_primary(self) -> bool:
        if self.role is not None:
            return self.role in PRIMARY_ROLES
        return self.is_leader


def parse_etcd_dsn(dsn: str) -> EtcdTarget:
    """`etcd://[user:pw@]h1:p1,h2:p2/<namespace>[/<scope>][?params]`; ValueError when malformed."""
    parts = urlsplit(dsn)
    if parts.scheme != "etcd":
        raise ValueError("expected etcd://host:port[,host:port...]/namespace[/scope] (Patroni's DCS: only etcd "
                         "is supported)")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    if not hostlist:
        raise ValueError("no etcd host")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    tls = {k: params.pop(k) for k in ETCD_TLS_PARAMS if k in params}
    scheme = "https" if tls else "http"
    endpoints = []
    for host in hostlist.split(","):
        host = host.strip()
        if not host:
            raise ValueError(f"empty host in {hostlist!r}")
        if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+)(:\d{1,5})?", host):
            raise ValueError(f"bad host {host!r} (expected host or host:port)")
        if not re.search(r":\d+$", host):
            host += ":2379"
        endpoints.append(f"{scheme}://{host}")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not segments:
        namespace, scope = DEFAULT_NAMESPACE, None
    elif len(segments) == 1 or parts.path.endswith("/"):
        namespace, scope = "/".join(segments), None
    else:
        namespace, scope = "/".join(segments[:-1]), segments[-1]
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username, password = unquote(user), (unquote(pw) if colon else "")
    return EtcdTarget(endpoints=tuple(endpoints), namespace=namespace, scope=scope, username=username,
                      password=password, ca_file=tls.get("ca_file"), cert_file=tls.get("cert_file"),
                      key_file=tls.get("key_file"), pg_params=params)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _range_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix": the prefix with its last byte + 1."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # the prefix ends with "/" (0x2f): never 0xff
    return base64.b64encode(bytes(raw)).decode()


def parse_members(target: EtcdTarget, kvs: list[dict[str, Any]]) -> list[PatroniMember]:
    """Patroni's members from the key/values of a range read (base64 keys and values)."""
    leaders: dict[str, str] = {}
    found: list[tuple[str, str, dict[str, Any]]] = []
    base = f"/{target.namespace}/"
    for kv in kvs:
        key = base64.b64decode(kv.get("key", "")).decode(errors="replace")
        value = base64.b64decode(kv.get("value", "")).decode(errors="replace")
        if not key.startswith(base):
            continue
        rest = key[len(base):].split("/")
        if len(rest) == 2 and rest[1] == "leader":
            leaders[rest[0]] = value.strip()
        elif len(rest) == 3 and rest[1] == "members" and rest[2]:
            try:
                data = json.loads(value)
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("conn_url"), str):
                found.append((rest[0], rest[2], data))
    members = []
    for scope, name, data in found:
        role, state = data.get("role"), data.get("state")
        members.append(PatroniMember(scope=scope, name=name, conn_url=data["conn_url"],
                                     role=role if isinstance(role, str) else None,
                                     state=state if isinstance(state, str) else None,
                                     is_leader=leaders.get(scope) == name))
    return sorted(members, key=lambda m: (m.scope, m.name))


async def read_etcd_members(target: EtcdTarget, *, request_seconds: float = 5.0) -> list[PatroniMember]:
    """Read the members from the first etcd host that answers. SourceUnavailable if none does."""
    failures = []
    verify: ssl.SSLContext | bool = True
    if target.ca_file or target.cert_file:
        try:
            verify = ssl.create_default_context(cafile=target.ca_file)
            if target.cert_file:
                verify.load_cert_chain(target.cert_file, target.key_file)
        except (OSError, ssl.SSLError) as e:
            raise SourceUnavailable(f"etcd: TLS files: {_describe(e)}") from e
    async with httpx.AsyncClient(timeout=request_seconds, verify=verify, trust_env=False) as client:
        for endpoint in target.endpoints:
            try:
                with trio.fail_after(request_seconds * 2):
                    kvs = await _etcd_range(client, endpoint, target)
            except (httpx.HTTPError, ValueError, KeyError, TypeError, trio.TooSlowError, _EtcdError) as e:
                failures.append(f"{endpoint}: {_describe(e)}")
                continue
            return parse_members(target, kvs)
    raise SourceUnavailable("etcd: " + "; ".join(failures))


class _EtcdError(Exception):
    pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    text = " ".join(str(exc).split())
    return text or exc.__class__.__name__


async def _etcd_range(client: httpx.AsyncClient, endpoint: str, target: EtcdTarget) -> list[dict[str, Any]]:
    headers = {}
    if target.username is not None:
        auth = await client.post(f"{endpoint}/v3/auth/authenticate",
                                 json={"name": target.username, "password": target.password or ""})
        if auth.status_code != 200:
            raise _EtcdError(f"authentication failed: HTTP {auth.status_code} {_etcd_message(auth)}")
        headers["Authorization"] = str(auth.json()["token"])
    body = {"key": _b64(target.prefix), "range_end": _range_end(target.prefix)}
    response = await client.post(f"{endpoint}/v3/kv/range", json=body, headers=headers)
    if response.status_code != 200:
        raise _EtcdError(f"HTTP {response.status_code} {_etcd_message(response)}")
    data = response.json()
    if not isinstance(data, dict):
        raise _EtcdError("unexpected answer")
    kvs = data.get("kvs", [])
    if not isinstance(kvs, list):
        raise _EtcdError("unexpected answer")
    return kvs


def _etcd_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or "")
    return ""


def patroni_children(source: SourceConfig, target: EtcdTarget, members: list[PatroniMember]) -> list[SourceConfig]:
    """Each member (only the primary with only_if_primary) as a concrete source, sorted by name."""
    children = []
    for member in members:
        if source.only_if_primary and not member.is_primary:
            continue
        name = f"{source.name}_{member.name}" if target.scope else f"{source.name}_{member.scope}_{member.name}"
        dsn = with_parameters(member.conn_url, target.pg_params) if target.pg_params else member.conn_url
        children.append(attrs.evolve(source, name=name, dsn=dsn, kind="postgres", include_pattern=None,
                                     exclude_pattern=None))
    return sorted(children, key=lambda s: s.name)
