"""Redaction: what may be printed of a connection string (never its password)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


def redact_dsn(dsn: str) -> str:
    """The dsn with any password replaced by `***`, safe for logs."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable dsn>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostinfo}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
