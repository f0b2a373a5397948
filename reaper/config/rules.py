"""Value rules for the configuration models: attrs validators with one clear message each. No I/O.

Each validator raises `FieldValueError`; the converter's structure hook (reaper.config.schema) runs every
validator of a table, so that `check` reports every bad value at once, one line each, with its key path.
Constructing a model in code runs the same validators (attrs), so a bad value never reaches the daemon.

Bounds, and why:
- every `*_seconds` duration is finite and at most MAX_SECONDS: statement timeouts are sent to PostgreSQL
  in milliseconds, an int4 (2147483647 ms); the same bound keeps every other deadline far from overflow;
- a timeout sent as a server-side statement_timeout is at least 1 ms (0 would mean "no timeout");
- names (source, group, tag keys, metric, preset) have no control characters: they end up in log lines,
  Prometheus labels and storage rows, where a newline splits a log line and a NUL stops every write.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from reaper.config.libpq import keyword_dsn_to_uri, parse_keyword_dsn
from reaper.config.regex import are_problem

MAX_SECONDS = 2_147_483  # PostgreSQL's statement_timeout is an int4 of milliseconds
MAX_INTERVAL_SECONDS = 366 * 24 * 3600  # a metric interval: at most a year
MAX_COUNT = 2**31 - 1  # counts and sizes of things held in memory (batch sizes, queue capacities)
MAX_BYTES = 2**62  # sizes on disk

Validator = Callable[[Any, Any, Any], None]


class FieldValueError(ValueError):
    """A value that breaks its field's rule. `key` names an entry inside the field (a mapping key)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.message = message
        self.key = key
        super().__init__(f"{key}: {message}" if key is not None else message)


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def number(low: float | None = None, high: float | None = None, *, above: bool = False,
           optional: bool = False, why: str = "") -> Validator:
    """A finite number within [low, high] (`above`: strictly more than low); None allowed if optional."""

    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if value is None and optional:
            return
        problem = number_problem(value, low, high, above=above)
        if problem:
            raise FieldValueError(problem + (f" ({why})" if why and "at most" in problem else ""))

    return check


def number_problem(value: Any, low: float | None, high: float | None, *, above: bool = False) -> str | None:
    """What is wrong with a number (None if nothing)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if low is not None and above and not value > low:
        return f"must be more than {_fmt(low)}, got {_fmt(value)}"
    if low is not None and not above and value < low:
        return f"must be {_fmt(low)} or more, got {_fmt(value)}"
    if high is not None and value > high:
        return f"must be at most {_fmt(high)}, got {_fmt(value)}"
    return None


def seconds(low: float = 0.0, *, above: bool = True, optional: bool = False,
            high: float = MAX_SECONDS) -> Validator:
    """A duration in seconds: finite, more than `low` (or at least, with above=False), at most MAX_SECONDS."""
    return number(low, high, above=above, optional=optional,
                  why="PostgreSQL's statement_timeout limit, 2147483647 ms")


def control_characters(text: str) -> list[str]:
    """The control characters in text, shown escaped (e.g. ['\\n', '\\x00'])."""
    return sorted({repr(c)[1:-1] for c in text if unicodedata.category(c) == "Cc"})


def name(*, optional: bool = False, what: str = "name") -> Validator:
    """A non-empty name without control characters."""

    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if value is None and optional:
            return
        problem = name_problem(value, what)
        if problem:
            raise FieldValueError(problem)

    return check


def name_problem(value: str, what: str = "name") -> str | None:
    if not value.strip():
        return f"{what} must not be empty"
    bad = control_characters(value)
    if bad:
        return f"{what} must not contain control characters (found {', '.join(bad)})"
    return None


def names(*, what: str = "name") -> Validator:
    """Every item of a tuple of names is a valid name."""

    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        for i, item in enumerate(value):
            problem = name_problem(item, what)
            if problem:
                raise FieldValueError(problem, key=f"[{i}]")

    return check


def schemas(instance: Any, attribute: Any, value: Any) -> None:
    """A source's search_path: schema names as they are (case kept), not "$user" (whoever owns a schema named
    like reaper's role would decide what the metrics run: reaper.db.facts)."""
    names(what="a schema name")(instance, attribute, value)
    for i, item in enumerate(value):
        if item.strip().strip('"').lower() == "$user":
            raise FieldValueError('"$user" is not taken: name the schema (its owner would decide what the metrics '
                                  "run)", key=f"[{i}]")
        if "," in item:
            raise FieldValueError(f"{item[:40]!r} is one schema name, not a list: write one string per schema",
                                  key=f"[{i}]")


def tags(_instance: Any, _attribute: Any, value: Mapping[str, str]) -> None:
    """Tag keys are names; tag values hold no NUL (PostgreSQL text cannot store it)."""
    for key, text in value.items():
        problem = name_problem(key, "a tag key")
        if problem:
            raise FieldValueError(problem, key=repr(key) if control_characters(key) or not key else key)
        if "\x00" in text:
            raise FieldValueError("a tag value must not contain a NUL character", key=key)


def intervals(_instance: Any, _attribute: Any, value: Mapping[str, int]) -> None:
    """metric name -> interval seconds: 0 disables, otherwise 1 .. a year."""
    for metric, interval in value.items():
        if not metric.strip() or control_characters(metric):
            raise FieldValueError("a metric name must not be empty or contain control characters",
                                  key=repr(metric))
        if not 0 <= interval <= MAX_INTERVAL_SECONDS:
            raise FieldValueError(f"interval must be 0 (disabled) or 1 .. {MAX_INTERVAL_SECONDS} seconds, "
                                  f"got {interval}", key=metric)


def optional_path(_instance: Any, _attribute: Any, value: str | None) -> None:
    """None (the default) or a non-empty path (an empty one would silently mean the current directory)."""
    if value is not None and not value.strip():
        raise FieldValueError('must not be empty (leave the key out for the default)')
    if value is not None and "\x00" in value:
        raise FieldValueError("must not contain a NUL character")


def pattern(_instance: Any, _attribute: Any, value: str | None) -> None:
    """None or a regular expression the server will take (a discovery source's include/exclude_pattern, matched
    by `datname ~ pattern`): checked offline, as far as reaper.config.regex is sure."""
    if value is None:
        return
    if "\x00" in value:
        raise FieldValueError("must not contain a NUL character")
    if (problem := are_problem(value)) is not None:
        raise FieldValueError(f"{value!r} is not a regular expression PostgreSQL accepts: {problem}")


_PORT_RE = re.compile(r"(?i)[?&]port=([^&]*)")


def sql_texts(_instance: Any, _attribute: Any, value: Mapping[int, str] | str | None) -> None:
    """SQL without a NUL character: PostgreSQL's protocol cannot carry one (the server drops the connection)."""
    texts = {"": value} if isinstance(value, str) else value or {}
    for key, sql in texts.items():
        if "\x00" in sql:
            raise FieldValueError("SQL must not contain a NUL character (PostgreSQL cannot take one)",
                                  key=f"{key}" if key != "" else None)


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")  # libpq's
DSN_EXPECTED = "expected a postgresql:// URI or a libpq key=value string"


def uri_dsn(value: str) -> str:
    """A libpq key=value connection string (`host=db1 port=5433 dbname=app`, which pgwatch and psql take too)
    as the postgresql:// URI reaper connects with; anything else as it is (its check says what is wrong)."""
    if "://" in value or "=" not in value:
        return value
    try:
        pairs = parse_keyword_dsn(value)
    except ValueError as e:
        raise FieldValueError(f"{DSN_EXPECTED} ({e})") from None
    for key, text in pairs:
        if key == "port" and not all(p.strip().isdigit() for p in text.split(",")):
            raise FieldValueError(f"port {text!r} is not a number from 1 to 65535")
    return keyword_dsn_to_uri(pairs)


def dsn_ports(_instance: Any, _attribute: Any, value: str) -> None:
    """Every port in a URI dsn (`host:port`, comma-separated hosts, `?port=`) is a number 1..65535, and
    its `sslmode` one of libpq's.

    The message shows only the port text, never the rest of the dsn (it may hold a password)."""
    found = control_characters(value.replace("%00", "\x00"))  # (a NUL breaks the protocol: the server hangs up)
    if found:
        raise FieldValueError(f"a dsn must not contain control characters (found {', '.join(found)})")
    scheme, sep, rest = value.partition("://")
    if not sep:
        return  # not a URI: the kind's own check says what it expects
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" not in netloc and "@" in rest[len(netloc):].partition("=")[0]:
        # `postgresql://u:se/cret@host/db`: the URI's user part ends at the '/', and its "host:port" is the
        # user and the password's start (a port error would have shown it); the dsn is not shown
        raise FieldValueError("the part before '@' holds a '/', '?' or '#', which ends a URI's user:password: "
                              "percent-encode them there (/ as %2F, ? as %3F, # as %23; and '@' in a database "
                              "name as %40)")
    hosts = netloc.rpartition("@")[2]
    ports: list[str] = []
    for host in hosts.split(","):
        if host.startswith("["):  # [IPv6]:port
            _, close, after = host.partition("]")
            if not close:
                raise FieldValueError("an IPv6 host lacks its closing ']'")
            if after:
                if not after.startswith(":"):
                    raise FieldValueError("expected ':port' after an IPv6 host's ']'")
                ports.append(after[1:])
        elif ":" in host:
            ports.append(host.rpartition(":")[2])
    query = rest.partition("?")[2].partition("#")[0]
    ports.extend(m.group(1) for m in _PORT_RE.finditer("?" + query))
    for port in ports:
        for one in port.split(","):
            if one == "" and scheme.startswith("postgres"):
                continue  # libpq: an empty port means the default
            if not one.isdigit() or not 1 <= int(one) <= 65535:
                raise FieldValueError(f"port {one[:20]!r} is not a number from 1 to 65535")
    if scheme.startswith("postgres"):  # a typo here would leave the source down, retried for ever
        from urllib.parse import parse_qsl

        for key, mode in parse_qsl(query, keep_blank_values=True):
            if key == "sslmode" and mode not in SSLMODES:
                raise FieldValueError(f"sslmode {mode[:20]!r} is not one of {', '.join(SSLMODES)}")
        from reaper.config.libpq import parameter_problems

        problems = parameter_problems(value)
        if problems:
            raise FieldValueError("; ".join(problems))


def source_dsn(instance: Any, attribute: Any, value: str) -> None:
    """dsn_ports, and no search_path of its own: a source's sessions pin theirs (reaper.db.facts), which would
    replace it without a word."""
    dsn_ports(instance, attribute, value)
    from urllib.parse import parse_qsl

    for key, setting in parse_qsl(value.partition("?")[2].partition("#")[0], keep_blank_values=True):
        if key.strip().lower() == "search_path" or (key.strip().lower() == "options" and "search_path" in setting):
            raise FieldValueError("search_path in the dsn is not used (reaper pins the names its metrics see): "
                                  "list the schemas in the source's search_path key")


def listen(_instance: Any, _attribute: Any, value: str) -> None:
    """host:port ("[::1]:port" for IPv6, ":port" for every IPv4 address), port 0 .. 65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise FieldValueError(f"expected host:port (e.g. 127.0.0.1:9187), got {value!r}")
    if int(port) > 65535:
        raise FieldValueError(f"port {port} is not a number from 0 to 65535")
    if host.startswith("[") != host.endswith("]"):
        raise FieldValueError(f"expected [IPv6 address]:port, got {value!r}")
    if control_characters(host) or " " in host:
        raise FieldValueError(f"host {host!r} is not a host name or address")


RESERVED_PROMETHEUS_PREFIX = "reaper"


def prometheus_namespace(_instance: Any, _attribute: Any, value: str) -> None:
    """A metric-name prefix: not empty, [a-zA-Z_][a-zA-Z0-9_]*, and not reaper's own `reaper_*` families'."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise FieldValueError(f"expected a Prometheus name prefix ([a-zA-Z_][a-zA-Z0-9_]*, not empty), got {value!r}"
                              " (an empty one lets a metric's series collide with reaper_* families)")
    if value == RESERVED_PROMETHEUS_PREFIX or value.startswith(RESERVED_PROMETHEUS_PREFIX + "_"):
        raise FieldValueError(f"{value!r} would collide with reaper's own reaper_* families; choose another")
