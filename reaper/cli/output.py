"""Output formats of the listing commands (`metrics list|show`, `status`, `once`).

- `table`: rich tables for a person at a terminal (the default when stdout is a terminal);
- `plain`: one line per item, tab-separated fields, no box drawing and no wrapping, so `grep`, `cut`
  and `awk -F'\\t'` see whole values (the default when stdout is a pipe or a file). The first field
  says what the line is (`metric`, `preset`, `source`, `sink`, ...). Tabs, newlines and backslashes
  inside a value are written as `\\t`, `\\n`, `\\\\`, so one item is always one line;
- `json`: one JSON document (an object or an array) for scripts.
"""

from __future__ import annotations

import datetime as dt
import decimal
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import orjson

FORMATS = ("table", "plain", "json")


def choose_format(requested: str | None, stream: TextIO | None = None) -> str:
    """The requested format, else `table` on a terminal and `plain` otherwise."""
    if requested:
        return requested
    stream = stream or sys.stdout
    try:
        return "table" if stream.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


def plain_field(value: Any) -> str:
    """A value as one tab-free, newline-free field (None is empty)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.isoformat()
    text = value if isinstance(value, str) else str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def print_plain(*fields: Any, file: TextIO | None = None) -> None:
    print("\t".join(plain_field(f) for f in fields), file=file or sys.stdout)


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() and value.is_finite() else float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def json_text(document: Any) -> str:
    return orjson.dumps(document, default=_json_default,
                        option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()


def print_json(document: Any, file: TextIO | None = None) -> None:
    print(json_text(document), file=file or sys.stdout)


def joined(items: Iterable[Any]) -> str:
    return ",".join(str(i) for i in items)
