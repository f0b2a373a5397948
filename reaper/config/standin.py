"""A config table that did not structure, stood in for so that one `check` names every problem at once."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from reaper.config.schema import _format_cattrs_errors

T = TypeVar("T")

STAND_IN_ROUNDS = 4  # problems found one after the other (a type, then a value's range) within one table
STAND_INS = {"dsn": "postgresql://stand-in/"}  # a required key whose value was at fault: the rest still checked


def stand_in(table: Mapping[str, Any], structure: Callable[[Any], T], lines: list[str], where: str,
              more: list[str]) -> T | None:
    """A table that did not structure, with the entries its problem `lines` name left out (a key, or one entry
    of a key's table; a required dsn replaced by a stand-in), structured again: the checks of the rest (names,
    references, files) still run on it, so one `check` names every problem at once. The problems that only
    show once those entries are out (a value's range, checked after the types) go to `more`. None when even
    that fails or a `kind`/`type` is at fault (the other checks depend on it). Never part of a Config: the
    lines it stands in for already fail it."""
    if not isinstance(table, Mapping):
        return None
    pruned: dict[str, Any] = dict(table)
    seen, gone = set(lines), set()  # the lines said so far; the keys taken out
    for _ in range(STAND_IN_ROUNDS):
        for line in lines:
            found = _entry(line, where)
            if found is None or found[0] in ("kind", "type"):
                return None
            key, entry = found
            if entry is not None and isinstance(pruned.get(key), Mapping):
                pruned[key] = {k: v for k, v in pruned[key].items() if k != entry}
            elif key in STAND_INS:
                pruned[key] = STAND_INS[key]
            else:
                pruned.pop(key, None)
                gone.add(key)
        try:
            return structure(pruned)
        except Exception as e:
            lines = _format_cattrs_errors(e, where)
        # new problems are said (not those of a key taken out: "required"); one said already could not be taken
        # out (an entry the line quotes): no stand-in then
        fresh = [line for line in lines if line not in seen and (_entry(line, where) or ("",))[0] not in gone]
        more.extend(fresh)
        seen.update(fresh)
        if len(fresh) < len(lines) or not fresh:
            return None
    return None


def _entry(line: str, where: str) -> tuple[str, str | None] | None:
    """The key (and the entry of its table) a problem line names: `sources[0].metrics.wal: ...`."""
    found = re.match(r"\.([^.\[]+)(?:\.([^.\[]+))?", line.split(": ", 1)[0].removeprefix(where))
    return None if found is None else (found[1], found[2])
