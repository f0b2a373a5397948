"""pgwatch's conn_str as reaper's dsn: postgresql:// URIs, libpq key=value strings, etcd://, `$VAR`."""

from __future__ import annotations

import re
from collections.abc import Callable

from reaper.catalog.pgwatch.common import env_field, literal_dollars

_URI = re.compile(r"^postgres(ql)?://", re.IGNORECASE)
_WHOLE_ENV = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def convert_dsn(conn_str: str, note: Callable[[str], None]) -> tuple[str, bool]:
    """pgwatch's conn_str as our dsn, and whether `reaper check` accepts it."""
    value = conn_str.strip()
    if value.startswith("$"):
        dsn, names = env_field(value)
        if _WHOLE_ENV.match(dsn):
            note(f"pgwatch reads it from ${names[0]}: written as dsn = \"{dsn}\", which reaper expands when it "
                 "loads the config; that variable must then hold a postgresql:// URI")
        else:
            note(f"written as {dsn!r}: reaper expands ${{VAR}} when it loads the config")
        return dsn, True
    if _URI.match(value):
        scheme, rest = value.split("://", 1)
        value = f"{scheme.lower()}://{rest}"
        _warn_password(value, note)
        return literal_dollars(value), True  # a `$` in a password is literal in pgwatch: $$ for reaper
    if value.lower().startswith("etcd://"):
        return value, True  # patroni's DCS; whether the kind fits is checked with the rest of the source
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        scheme = value.split("://", 1)[0]
        dcs = " (of Patroni's DCSs only etcd is supported)" if scheme in ("consul", "zookeeper") else ""
        note(f"the address is {scheme}://...: reaper connects only to postgresql:// URIs and reads Patroni "
             f"members from etcd://{dcs}; the source is written commented out")
        return _redact_userinfo(value), False
    try:
        pairs = parse_keyword_dsn(value)
    except ValueError as e:
        note(f"neither a postgresql:// URI nor a libpq key=value string ({e}); the source is written commented out")
        return "", False
    dsn = keyword_dsn_to_uri(pairs)
    note("libpq key=value string written as a postgresql:// URI")
    _warn_password(dsn, note)
    return literal_dollars(dsn), True


def _redact_userinfo(uri: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", uri)


def _warn_password(dsn: str, note: Callable[[str], None]) -> None:
    m = re.match(r"^[^:]+://([^/?#]*)@", dsn)
    inline = bool(m and ":" in m.group(1) and not re.search(r":\$\{[^}]+\}$", m.group(1)))
    query = re.search(r"[?&]password=([^&]*)", dsn)
    if inline or (query and not query.group(1).startswith("${")):
        note("has a password in it, kept as it is: better put ${ENV_VAR} in the dsn, or use ~/.pgpass or "
             "password_file, and keep the config free of secrets")


def parse_keyword_dsn(text: str) -> list[tuple[str, str]]:
    """libpq's `key=value key='quoted \\' value'` connection string as (key, value) pairs."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i:])
        if not m:
            raise ValueError(f"unexpected {text[i]!r} at position {i + 1}")
        key = m.group(0)
        i += len(key)
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=":
            raise ValueError(f"missing '=' after {key!r}")
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError(f"unterminated quoted value of {key!r}")
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    value.append(text[i])
                    i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                else:
                    value.append(text[i])
                    i += 1
        pairs.append((key, "".join(value)))
    if not pairs:
        raise ValueError("empty")
    return pairs


def keyword_dsn_to_uri(pairs: list[tuple[str, str]]) -> str:
    """The same connection as a postgresql:// URI (libpq's URI form: hosts and ports, user, password, dbname)."""
    from urllib.parse import quote, urlencode

    params = dict(pairs)
    user = params.pop("user", None)
    password = params.pop("password", None)
    dbname = params.pop("dbname", None)
    hosts = [h.strip() for h in params.pop("host", "").split(",")] if "host" in params else []
    ports = [p.strip() for p in params.pop("port", "").split(",")] if "port" in params else []
    query: dict[str, str] = {}
    netloc_hosts: list[str] = []
    if any(h.startswith(("/", "@")) for h in hosts) or len(ports) > max(len(hosts), 1):
        query["host"] = ",".join(hosts) if hosts else ""
        if not query["host"]:
            del query["host"]
        if ports:
            query["port"] = ",".join(ports)
    else:
        for n, host in enumerate(hosts or [""]):
            port = ports[n] if n < len(ports) else (ports[0] if len(ports) == 1 else "")
            shown = f"[{host}]" if ":" in host else quote(host, safe="")
            netloc_hosts.append(f"{shown}:{port}" if port else shown)
    userinfo = ""
    if user is not None:
        userinfo = quote(user, safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    netloc = (userinfo + "@" if userinfo else "") + ",".join(netloc_hosts)
    query.update(params)
    uri = f"postgresql://{netloc}/{quote(dbname, safe='') if dbname else ''}"
    if query:
        uri += "?" + urlencode(query, safe="/,@", quote_via=quote)
    return uri
