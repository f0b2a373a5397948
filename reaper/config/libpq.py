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


# libpq connection parameters that asyncpg, reaper's driver, does not know: it would send each to the server as a
# setting, and the server refuses the connection ("unrecognized configuration parameter": a source down for
# ever). Those below are taken off the DSN before connecting: reaper's own deadlines and application_name do
# their work (connect_timeout is honoured, as asyncpg's connect timeout; keepalives* and tcp_user_timeout as the
# socket's options, KEEPALIVE_DEFAULTS).
CLIENT_ONLY = frozenset({"connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                         "tcp_user_timeout", "sslcompression", "sslsni", "fallback_application_name", "gssdelegation",
                         "sslkeylogfile"})
# ... and these too when their value asks only for what happens anyway (`check` refuses the other values)
ASYNCPG_DOES = {"gssencmode": ("disable", "prefer", "allow"), "channel_binding": ("disable", "prefer"),
                "sslcertmode": ("disable", "allow"), "load_balance_hosts": ("disable",)}
# what asyncpg cannot do at all, and what to write instead
UNSUPPORTED = {
    "hostaddr": "put the address in the host part of the dsn",
    "requirepeer": "use a role with its own password or certificate",
    "require_auth": "reaper's driver takes whatever the server's pg_hba.conf asks for",
    "sslcrldir": "use sslcrl (one file)",
    "gssencmode": "reaper's driver has no GSSAPI encryption: use TLS (sslmode)",
    "channel_binding": "reaper's driver does not bind SCRAM to the TLS channel: use sslmode=verify-full",
    "sslcertmode": "reaper's driver sends a client certificate when sslcert names one",
    "load_balance_hosts": "reaper's driver tries the hosts in their order",
}
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
# a read-only session (every source's, reaper.db) is one asyncpg takes for read-only whatever the server: what a
# monitoring connection means by libpq's read-write / read-only is a primary / a standby
READ_ONLY_TARGETS = {"read-write": "primary", "read-only": "standby"}


def _query_items(dsn: str) -> tuple[str, list[tuple[str, str, str]], str]:
    """(the dsn before '?', [(key, value, raw item)], '#...' or '') of a URI dsn; no items for another form."""
    from urllib.parse import unquote

    head, sep, rest = dsn.partition("?")
    if not sep or "://" not in head:
        return dsn, [], ""
    query, hash_, fragment = rest.partition("#")
    items = []
    for raw in query.split("&"):
        if not raw:
            continue
        key, _, value = raw.partition("=")
        items.append((unquote(key).strip().lower(), unquote(value).strip(), raw))
    return head, items, hash_ + fragment


def parameter_problems(dsn: str) -> list[str]:
    """What `check` refuses in a URI dsn's parameters: what reaper's driver cannot honour, a bad value."""
    problems = []
    for key, value, _ in _query_items(dsn)[1]:
        if key in UNSUPPORTED and value.lower() not in ASYNCPG_DOES.get(key, ()):
            allowed = ASYNCPG_DOES.get(key)
            taken = f" (only {', '.join(allowed)} is taken)" if allowed else ""
            problems.append(f"{key}={value[:20]} is not supported{taken}: {UNSUPPORTED[key]}")
        elif key == "connect_timeout" and not value.lstrip("-").isdigit():
            problems.append(f"connect_timeout {value[:20]!r} is not a whole number of seconds")
        elif key in KEEPALIVE_DEFAULTS and not value.isdigit():
            problems.append(f"{key} {value[:20]!r} is not a whole number")
        elif key == "target_session_attrs" and value.lower() not in TARGET_SESSION_ATTRS:
            problems.append(f"target_session_attrs {value[:20]!r} is not one of {', '.join(TARGET_SESSION_ATTRS)}")
    return problems


FILE_PARAMETERS = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile")  # files the connect reads


def file_parameters(dsn: str) -> list[tuple[str, str]]:
    """(key, path) of each file a URI dsn names for the connect to read (`sslrootcert=system`: the system's CA
    store, no file)."""
    return [(key, value) for key, value, _ in _query_items(dsn)[1]
            if key in FILE_PARAMETERS and value and not (key == "sslrootcert" and value == "system")]


# TCP keepalives on every connection (reaper.db.tls), as libpq's keepalives* parameters say, with reaper's defaults
# where a DSN names none: an idle connection (a lane whose metrics run hourly, the storage between flushes) sends a
# probe each minute, so a load balancer or NAT that forgets idle flows (AWS NLB after 350 s, Azure's after 4 min)
# keeps it, and a peer gone silently is noticed within two minutes, not at the next statement's timeout
KEEPALIVE_DEFAULTS = {"keepalives": 1, "keepalives_idle": 60, "keepalives_interval": 10, "keepalives_count": 6,
                      "tcp_user_timeout": 0}  # (seconds; tcp_user_timeout in milliseconds, 0: the system's)


def keepalive_settings(dsn: str) -> dict[str, int]:
    """KEEPALIVE_DEFAULTS with what the DSN sets (a value that is not a whole number keeps the default: `check`
    says so)."""
    found = dict(KEEPALIVE_DEFAULTS)
    if "?" in dsn:
        for key, value, _ in _query_items(dsn)[1]:
            if key in found and value.isdigit():
                found[key] = int(value)
    return found


def asyncpg_dsn(dsn: str, *, read_only: bool) -> tuple[str, float | None]:
    """(the dsn asyncpg is given, connect_timeout in seconds or None): libpq's client-only parameters taken off
    (CLIENT_ONLY, ASYNCPG_DOES), and for a read-only session target_session_attrs read-write / read-only as
    primary / standby (READ_ONLY_TARGETS)."""
    if "?" not in dsn:
        return dsn, None
    head, items, fragment = _query_items(dsn)
    if not items:
        return dsn, None
    kept: list[str] = []
    seconds: float | None = None
    for key, value, raw in items:
        if key == "connect_timeout":
            # libpq: zero, negative or empty waits for ever; anything else at least 2 seconds
            number = int(value) if value.lstrip("-").isdigit() else 0
            seconds = float(max(number, 2)) if number > 0 else None
        elif key in CLIENT_ONLY or value.lower() in ASYNCPG_DOES.get(key, ()):
            continue
        elif key == "target_session_attrs" and read_only and value.lower() in READ_ONLY_TARGETS:
            kept.append(f"target_session_attrs={READ_ONLY_TARGETS[value.lower()]}")
        else:
            kept.append(raw)
    return head + ("?" + "&".join(kept) if kept else "") + fragment, seconds
