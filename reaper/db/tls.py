"""One TLS context shared by every source connection whose TLS settings are libpq's defaults.

asyncpg builds a new `ssl.SSLContext` for each connection whose sslmode is `prefer` (libpq's default
when a DSN over TCP names none) or `require`, and keeps it for the connection's whole life, also when
the server declined TLS and the connection is plain: about 15 KB of OpenSSL memory per connection that
tracemalloc does not see, a fifth of what one source costs in a 1000-source fleet (issue 14).

For a DSN with no certificate, key, CRL or protocol-version settings (in the DSN, the PGSSL*
environment or ~/.postgresql), every such context is the same, so reaper hands asyncpg one
context built like asyncpg's own (no certificate check, TLS 1.2 or newer, ALPN `postgresql`):

- `require`: asyncpg uses it as given; the behaviour is asyncpg's.
- `prefer`: asyncpg would treat a given context as `require`, so reaper gives `prefer` its meaning:
  TLS when the server offers it, else plain. A server that answers the TLS request with "no" is
  remembered for an hour (per DSN), so the next connections ask for plain at once instead of
  paying one more connection each; a server that takes TLS but then refuses the session (a
  `hostnossl`-only pg_hba.conf) gets a plain attempt as well, as asyncpg does for `prefer`.

Anything else (`disable`, `allow`, `verify-ca`, `verify-full`, certificate files) is left to asyncpg.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from reaper.config.libpq import asyncpg_dsn, keepalive_settings

#: DSN query keys and environment variables that make a connection's context its own
OWN_CONTEXT_KEYS = frozenset({"sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword", "sslnegotiation",
                              "ssl_min_protocol_version", "ssl_max_protocol_version"})
OWN_CONTEXT_ENV = ("PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT", "PGSSLCRL", "PGSSLNEGOTIATION",
                   "PGSSLMINPROTOCOLVERSION", "PGSSLMAXPROTOCOLVERSION", "SSLKEYLOGFILE")
#: how long a server that declined TLS is asked for plain at once
PLAIN_MEMORY_SECONDS = 3600.0
PLAIN_MEMORY_DSNS = 10_000  # at most this many remembered
REFUSED_MARK = "rejected SSL upgrade"  # asyncpg's ConnectionError when the server answers the TLS request "no"

_context: ssl.SSLContext | None = None
_plain_since: dict[str, float] = {}


def shared_context() -> ssl.SSLContext:
    """The process's one context for libpq-default TLS (built on first use)."""
    global _context
    if _context is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if ssl.HAS_ALPN:
            ctx.set_alpn_protocols(["postgresql"])
        _context = ctx
    return _context


def _dot_postgresql(name: str) -> bool:
    try:
        return (Path.home() / ".postgresql" / name).exists()
    except (RuntimeError, OSError):  # no home directory
        return False


def default_tls_mode(dsn: str) -> str | None:
    """'prefer' or 'require' when the DSN's TLS settings are libpq's defaults for that mode, else None."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
    except ValueError:
        return None
    if parts.scheme not in ("postgres", "postgresql") or OWN_CONTEXT_KEYS & query.keys():
        return None
    if any(os.environ.get(name) for name in OWN_CONTEXT_ENV):
        return None
    modes = query.get("sslmode") or ([os.environ["PGSSLMODE"]] if os.environ.get("PGSSLMODE") else ["prefer"])
    mode = modes[-1]
    if mode not in ("prefer", "require") or _dot_postgresql("postgresql.crt"):
        return None
    if mode == "require" and (_dot_postgresql("root.crt") or _dot_postgresql("root.crl")):
        return None  # asyncpg checks the server's certificate against them
    return mode


async def connect(dsn: str, kwargs: dict[str, Any]) -> Any:
    """asyncpg.connect(dsn, **kwargs), with the shared context where the DSN allows it (asyncio side), with
    the libpq parameters asyncpg does not know taken off the DSN (reaper.config.libpq.asyncpg_dsn), and with
    TCP keepalives as the DSN's libpq parameters say (reaper.config.libpq.KEEPALIVE_DEFAULTS)."""
    conn = await _connect(dsn, kwargs)
    transport = getattr(conn, "_transport", None)  # asyncpg keeps the asyncio transport it reads from
    with contextlib.suppress(OSError):  # an option the system refuses: the connection works without it
        keep_alive(transport.get_extra_info("socket") if transport is not None else None, keepalive_settings(dsn))
    return conn


def keep_alive(sock: Any, settings: dict[str, int]) -> None:
    """The socket's keepalive and user-timeout options (Linux's names; where the system lacks one, its own)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if settings["keepalives"] else 0)
    options = (("TCP_KEEPIDLE", "keepalives_idle"), ("TCP_KEEPINTVL", "keepalives_interval"),
               ("TCP_KEEPCNT", "keepalives_count")) if settings["keepalives"] else ()
    for option, key in (*options, ("TCP_USER_TIMEOUT", "tcp_user_timeout")):  # (libpq: the last one either way)
        if settings[key] > 0 and hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), settings[key])


async def _connect(dsn: str, kwargs: dict[str, Any]) -> Any:
    read_only = kwargs.get("server_settings", {}).get("default_transaction_read_only") == "on"
    dsn, seconds = asyncpg_dsn(dsn, read_only=read_only)
    if seconds is not None and "timeout" not in kwargs:
        kwargs = {**kwargs, "timeout": seconds}
    mode = "" if "ssl" in kwargs else default_tls_mode(dsn)
    if not mode:
        return await asyncpg.connect(dsn, **kwargs)
    if mode == "require":
        return await asyncpg.connect(dsn, ssl=shared_context(), **kwargs)
    since = _plain_since.get(dsn)
    if since is not None and time.monotonic() - since < PLAIN_MEMORY_SECONDS:
        return await asyncpg.connect(dsn, ssl=False, **kwargs)
    try:
        return await asyncpg.connect(dsn, ssl=shared_context(), **kwargs)
    except ConnectionError as e:
        if REFUSED_MARK not in str(e):
            raise
        now = time.monotonic()
        if len(_plain_since) >= PLAIN_MEMORY_DSNS:  # discovery's databases come and go: keep the recent
            for old in [d for d, t in _plain_since.items() if now - t >= PLAIN_MEMORY_SECONDS] or list(_plain_since):
                del _plain_since[old]
        _plain_since[dsn] = now
    except asyncpg.PostgresError:
        pass  # the server took TLS and then refused the session: prefer tries plain, as libpq does
    return await asyncpg.connect(dsn, ssl=False, **kwargs)
