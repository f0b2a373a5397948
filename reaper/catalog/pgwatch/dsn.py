"""pgwatch's conn_str as reaper's dsn: postgresql:// URIs, libpq key=value strings, etcd://, `$VAR`."""

from __future__ import annotations

import re
from collections.abc import Callable

from reaper.catalog.pgwatch.common import env_field, literal_dollars
from reaper.config.libpq import keyword_dsn_to_uri, parse_keyword_dsn

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
