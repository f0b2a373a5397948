"""libpq's key=value connection strings (`host=db1 port=5433 dbname='my app'`), read and written as the
postgresql:// URI reaper connects with (a config's dsn, pgwatch's conn_str)."""

from __future__ import annotations

import re


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
