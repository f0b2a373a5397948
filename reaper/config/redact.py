"""Redaction: what may be printed of a connection string or an error text (never a password)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit, urlunsplit


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


# -- secrets in free text (error messages, log lines) -------------------------------------------------

#: Passwords of the DSNs this process was configured with (remember_secrets), in every spelling.
_known_secrets: set[str] = set()
_MIN_SECRET_LEN = 4  # shorter ones are redacted only where the text's structure shows a password

_URI_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s\"'/@:]*:)[^\s\"']*@")
_PASSWORD_PARAM = re.compile(r"(?i)\b(password\s*=\s*)(?!\*\*\*)('(?:[^'\\]|\\.)*'?|[^\s&\"#]*)")
# libpq quotes the component it could not decode; that component may be the password
_LIBPQ_TOKEN = re.compile(r"(?i)((?:percent-encoded token|percent-encoded value): \")[^\"]*(\")")


def dsn_secrets(dsn: str) -> set[str]:
    """Every spelling of the password(s) in a DSN (URI userinfo, `?password=`, key=value `password=`):
    as written, percent-decoded and percent-encoded. Parsed by hand: the DSN may be malformed."""
    found: set[str] = set()
    scheme_end = dsn.find("://")
    if scheme_end >= 0 and "@" in dsn[scheme_end + 3:]:
        rest = dsn[scheme_end + 3:]
        candidates = {rest.rsplit("@", 1)[0]}  # up to the last @ (a password may contain / or ?)
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        if "@" in authority:
            candidates.add(authority.rsplit("@", 1)[0])
        for userinfo in candidates:
            if ":" in userinfo:
                found.add(userinfo.split(":", 1)[1])
    for m in _PASSWORD_PARAM.finditer(dsn):
        value = m.group(2)
        found.add(value)
        if len(value) >= 2 and value[0] == value[-1] == "'":
            found.add(value[1:-1].replace("\\'", "'").replace("\\\\", "\\"))
    spelled: set[str] = set()
    for secret in found:
        if secret:
            spelled |= {secret, unquote(secret, errors="replace"), quote(secret, safe=""), quote(secret)}
    spelled.discard("")
    return spelled


def remember_secrets(dsn: str) -> None:
    """Note a configured DSN's password, so that `scrub` removes it from any text."""
    _known_secrets.update(dsn_secrets(dsn))


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with passwords replaced by `***`: the given secrets (longest first), then whatever the
    text's structure shows is a password (URI userinfo, `password=`, libpq's undecodable token)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= _MIN_SECRET_LEN:
            text = text.replace(secret, "***")
    text = _URI_USERINFO.sub(r"\1***@", text)
    text = _PASSWORD_PARAM.sub(r"\1***", text)
    return _LIBPQ_TOKEN.sub(r"\1***\2", text)


def scrub(text: str) -> str:
    """`text` safe to show: no configured password (remember_secrets) and no password-shaped part."""
    return redact_text(text, _known_secrets)
