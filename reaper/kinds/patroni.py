"""The patroni kind: a Patroni cluster's members, read from etcd v3, as concrete postgres sources.

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
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
from typing import Any
from urllib.parse import parse_qsl, unquote

import attrs
import httpx
import trio

from reaper.config.schema import SourceConfig
from reaper.errors import SourceUnavailable
from reaper.kinds.dsn import with_parameters

log = logging.getLogger("reaper.kinds")

PRIMARY_ROLES = frozenset({"primary", "master"})
DEFAULT_NAMESPACE = "service"
ETCD_TLS_PARAMS = frozenset({"ca_file", "cert_file", "key_file"})


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
    # Not urlsplit: several hosts with an IPv6 one are no valid URL, and Python's own check for
    # that differs between patch releases (Debian's 3.11.2 raises "Invalid IPv6 URL"). Split by hand
    # as urlsplit would (the host list ends at the first '/', '?' or '#'), then each host on its own.
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme.lower() != "etcd":
        raise ValueError("expected etcd://host:port[,host:port...]/namespace[/scope] (Patroni's DCS: only etcd "
                         "is supported)")
    rest = rest.partition("#")[0]
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, rest = rest[:end], rest[end:]
    path, _, query = rest.partition("?")
    userinfo, _, hostlist = netloc.rpartition("@")
    if not hostlist:
        raise ValueError("no etcd host")
    params = dict(parse_qsl(query, keep_blank_values=True))
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
    segments = [unquote(s) for s in path.split("/") if s]
    if not segments:
        namespace, scope = DEFAULT_NAMESPACE, None
    elif len(segments) == 1 or path.endswith("/"):
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
