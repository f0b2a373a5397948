"""The one JSON encoding of measurement values, shared by every sink that writes JSON.

pgwatch is written in Go, and its stored values are what Go's `encoding/json` writes; its Grafana
dashboards cast them (`(data->>'col')::int8`). So reaper writes values the same way:

- float: Go's text (`floatEncoder`): the shortest digits that read back as the same float64;
  plain decimal form when 1e-6 <= |x| < 1e21 (so an integral value has no `.0`: `300`, `0`, `-0`),
  otherwise exponent form with a sign and no zero padding (`1e+21`, `1.5e-7`). NaN and infinities
  become null (pgwatch does the same, #1416).
- int: as it is (beyond 64 bits: its exact digits).
- Decimal (PostgreSQL numeric): pgwatch reads numeric through pgx as `pgtype.Numeric`, which writes
  its exact decimal text, never a float64. reaper writes the exact text too, except that an integral
  value is written without its zero fraction (`300`, where pgwatch writes `300.00` for a numeric
  with scale 2): the same number, and `::int8` accepts it. Magnitudes past 1e300 become a float.
- timedelta: seconds; bytes: hex; addresses: text; datetime: ISO 8601 (orjson's own form).

orjson does the writing. It already writes floats as Go does except in three places (integral
values, 1e-6 <= |x| < 1e-5, and integral |x| >= 2**53, where exact digits matter), so only those
floats are replaced before the call: an int, or an `orjson.Fragment` holding Go's text.
"""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import math
from collections.abc import Mapping
from typing import Any

import orjson

_INT53 = float(2**53)
_INT64_MIN = -(2**63)
_INT64_END = 2**64  # orjson writes unsigned 64-bit integers too
_MINUS_ZERO = orjson.Fragment(b"-0")
_DECIMAL_MAX_ADJUSTED = 300  # beyond this a numeric is written as a float (JSON readers use float64)
_ADDRESSES = (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network,
              ipaddress.IPv4Interface, ipaddress.IPv6Interface)


def go_float_text(x: float) -> str | None:
    """The JSON text Go's encoding/json writes for the float64 `x` (None for NaN and infinities)."""
    if not math.isfinite(x):
        return None
    if x == 0.0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    shortest = decimal.Decimal(repr(x)).normalize()  # Python's repr is the shortest round-trip text
    if 1e-6 <= abs(x) < 1e21:
        return format(shortest, "f")
    sign, digits, exponent = shortest.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
    power = exponent + len(digits) - 1
    return ("-" if sign else "") + mantissa + ("e+" if power > 0 else "e-") + str(abs(power))


def _float(x: float) -> Any:
    """`x`, or what orjson must be given instead so that it writes Go's text."""
    if x.is_integer():  # False for NaN and infinities, which orjson writes as null
        if -_INT53 < x < _INT53:
            if x == 0.0 and math.copysign(1.0, x) < 0:
                return _MINUS_ZERO
            return int(x)
        return orjson.Fragment(go_float_text(x) or "null")
    if 1e-6 <= abs(x) < 1e-5:
        return orjson.Fragment(go_float_text(x) or "null")
    return x


def _decimal(value: decimal.Decimal) -> Any:
    if not value.is_finite():
        return None
    if value.adjusted() > _DECIMAL_MAX_ADJUSTED or (value and value.adjusted() < -_DECIMAL_MAX_ADJUSTED):
        return _float(float(value))
    if value == value.to_integral_value():
        as_int = int(value)
        return as_int if _INT64_MIN <= as_int < _INT64_END else orjson.Fragment(str(as_int))
    return orjson.Fragment(format(value, "f"))


def json_default(value: Any) -> Any:
    """orjson's fallback for the types asyncpg returns that JSON has no direct form for."""
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
    if isinstance(value, dt.timedelta):
        return _float(value.total_seconds())
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, _ADDRESSES):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return go_values(list(value))
    if hasattr(value, "as_string"):  # a bit string (asyncpg's BitString): its bits, as PostgreSQL writes them
        return value.as_string()
    if hasattr(value, "isempty") and hasattr(value, "lower_inc"):  # a range: PostgreSQL's text form
        if value.isempty:
            return "empty"
        lower, upper = ("" if v is None else str(v) for v in (value.lower, value.upper))
        return f"{'[' if value.lower_inc else '('}{lower},{upper}{']' if value.upper_inc else ')'}"
    return str(value)


def go_values(value: Any) -> Any:
    """`value` with every float (in dicts and lists, at any depth) replaced as `_float` says.
    Returns `value` itself when nothing changes."""
    kind = type(value)
    if kind is float:
        return _float(value)
    if kind is dict:
        return _go_dict(value)
    if kind is list:
        return _go_list(value)
    if isinstance(value, Mapping):
        return _go_dict(dict(value))
    return value


_CONTAINS_FLOATS = frozenset({float, dict, list})

def _go_dict(d: dict[Any, Any]) -> dict[Any, Any]:
    types = set(map(type, d.values()))
    if float not in types:
        if dict not in types and list not in types:  # most rows of most metrics: one C-level pass
            return d
        return {key: go_values(item) for key, item in d.items()}
    if dict not in types and list not in types:  # a flat row with floats
        return {key: (_float(item) if type(item) is float else item) for key, item in d.items()}
    return {key: go_values(item) for key, item in d.items()}


def _go_list(items: list[Any]) -> list[Any]:
    if _CONTAINS_FLOATS.isdisjoint(map(type, items)):
        return items
    out: list[Any] | None = None
    for i, item in enumerate(items):
        new = go_values(item)
        if new is not item:
            if out is None:
                out = list(items)
            out[i] = new
    return items if out is None else out


def _big_ints(value: Any) -> Any:
    """`value` with integers beyond 64 bits as their exact digits (orjson refuses them)."""
    if type(value) is int and not _INT64_MIN <= value < _INT64_END:
        return orjson.Fragment(str(value))
    if isinstance(value, Mapping):
        return {k: _big_ints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_big_ints(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """JSON bytes for `value`, with Go's number text (see the module docstring)."""
    prepared = go_values(value)
    try:
        return orjson.dumps(prepared, default=json_default)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits or a key that is not a string (both rare)
        return orjson.dumps(_big_ints(prepared), default=json_default, option=orjson.OPT_NON_STR_KEYS)


def dumps_ready(value: Any) -> bytes:
    """`dumps` for a value whose numbers are already in Go's form (Measurement.go_ready): no pass of its own."""
    try:
        return orjson.dumps(value, default=json_default)
    except orjson.JSONEncodeError:
        return dumps(value)
