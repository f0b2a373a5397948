"""dsn surgery for discovered children: another database, extra libpq parameters."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import attrs

from reaper.config.schema import SourceConfig


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
    # a database name may hold what a source name must not (a newline, a NUL): shown escaped in the source's name
    shown = "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in dbname)
    return attrs.evolve(source, name=f"{source.name}_{shown}", dsn=with_database(source.dsn, dbname),
                        kind="postgres", include_pattern=None, exclude_pattern=None)
