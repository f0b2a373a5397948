"""The unit that travels from sources to sinks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs


@attrs.frozen(slots=True)
class Measurement:
    """The rows of one metric from one source at one tick. Never mutated after creation.

    `source` is the source name (pgwatch's "dbname"); `table` is where it is stored (the metric's
    storage_name, or its own name); `epoch_ns` is the sample time (the first row's `epoch_ns`
    column, else the collector's wall clock); `tags` are the source's custom tags.
    """

    source: str
    metric: str
    table: str
    epoch_ns: int
    rows: Sequence[Mapping[str, Any]]
    tags: Mapping[str, str] = attrs.field(factory=dict)
    # True when every number in `rows` is already in the form Go's encoding/json writes (reaper.db.go_rows),
    # so a JSON sink hands the rows to orjson as they are, without its own pass over every value
    go_ready: bool = False

    @classmethod
    def from_rows(cls, *, source: str, metric: str, table: str, rows: Sequence[Mapping[str, Any]],
                  tags: Mapping[str, str], wall_ns: int, go_ready: bool = False) -> Measurement:
        epoch = rows[0].get("epoch_ns") if rows else None
        return cls(source=source, metric=metric, table=table,
                   epoch_ns=int(epoch) if isinstance(epoch, int) else wall_ns, rows=tuple(rows), tags=tags,
                   go_ready=go_ready)
