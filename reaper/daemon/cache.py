"""The instance-level cache: metrics marked `instance_level` are fetched once per instance and shared.

Several sources often watch databases of one PostgreSQL instance; a metric that describes the whole
instance (WAL, replication, bgwriter, ...) gives the same rows to each of them. The key is the
instance (system identifier + host + port) and the metric; an entry is served while it is younger
than `max_age` seconds (trio clock).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs

Rows = list[dict[str, Any]]


@attrs.define(eq=False)
class InstanceCache:
    max_age: float = 30.0
    _entries: dict[Hashable, tuple[float, Rows]] = attrs.field(factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, key: Hashable, now: float, max_age: float | None = None) -> Rows | None:
        """The rows if they are younger than max_age (capped by the cache's own max_age)."""
        limit = self.max_age if max_age is None else min(max_age, self.max_age)
        entry = self._entries.get(key)
        if entry is None or now - entry[0] >= limit:
            self.misses += 1
            return None
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, now: float, rows: Rows) -> None:
        self._entries[key] = (now, rows)
        if len(self._entries) > 10_000:  # bounded: forget the oldest half
            for k, _ in sorted(self._entries.items(), key=lambda kv: kv[1][0])[: len(self._entries) // 2]:
                del self._entries[k]
