"""Where measurements a sink refuses for their content are set aside: `<state_dir>/rejected/<sink>/`.

A measurement that a sink cannot store for what it holds (a value its encoder rejects, a storage data
exception such as a NUL byte, a bug in the sink) is never retried (it would block every measurement
behind it) and never lost silently: it is appended to `<UTC date>.ndjson` in its sink's folder, one JSON
object per line with the sink, the error and the measurement itself. Values are written as far as they
can be (`repr` text for what JSON cannot hold), so the operator can see what was refused and why.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from reaper.fsutil import make_private_dir
from reaper.measurement import Measurement

log = logging.getLogger("reaper.sinks")


def rejected_directory(spill_directory: Path) -> Path:
    """The rejected/ folder of the sink whose spill queue is in `spill_directory` (`<state>/spill/<slug>`)."""
    return spill_directory.parent.parent / "rejected" / spill_directory.name


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _document(label: str, m: Measurement, reason: str, now: dt.datetime) -> bytes:
    doc: dict[str, Any] = {"rejected_at": now.isoformat(), "sink": label, "error": reason, "source": m.source,
                           "metric": m.metric, "table": m.table, "epoch_ns": m.epoch_ns}
    try:
        body = orjson.dumps({"tags": dict(m.tags), "rows": list(m.rows)}, default=repr,
                            option=orjson.OPT_NON_STR_KEYS)
        doc["tags"], doc["rows"] = orjson.loads(body).values()
    except (TypeError, ValueError, RecursionError):  # what JSON cannot hold at all: its Python text
        doc["tags"], doc["rows_repr"] = {str(k): repr(v) for k, v in m.tags.items()}, repr(m.rows)[:1_000_000]
    return orjson.dumps(doc) + b"\n"


def set_aside(directory: Path | None, label: str, measurements: Sequence[Measurement],
              error: BaseException) -> Path | None:
    """Append the measurements to today's rejected file; the file, or None when it cannot be written
    (then the measurements are logged, one line each, so they are still not lost silently)."""
    now = dt.datetime.now(dt.UTC)
    reason = describe(error)
    data = b"".join(_document(label, m, reason, now) for m in measurements)
    if directory is not None:
        path = directory / f"{now:%Y-%m-%d}.ndjson"
        try:
            make_private_dir(directory)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            return path
        except OSError as e:
            log.error("sink %s: cannot write the rejected file %s: %s", label, path, e.strerror or e)
    for line in data.splitlines():
        log.error("sink %s: rejected measurement (not stored anywhere else): %s", label, line.decode()[:2000])
    return None
