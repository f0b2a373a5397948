"""The instance-level cache: metrics marked `instance_level` are fetched once per instance and shared.

Several sources often watch databases of one PostgreSQL instance; a metric that describes the whole
instance (WAL, replication, bgwriter, ...) gives the same rows to each of them. The key is the
instance (system identifier + host + port) and the metric; an entry is served while it is younger
than `max_age` seconds (trio clock).

A sample is delivered once per source (issue 12, duplicate samples): an entry remembers the source
that fetched it and is never served back to that source, and each entry has a serial number so a
source that already delivered an entry is not served it again (`get(..., seen=serial)`): it fetches
fresh rows instead, with a new epoch_ns.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Any

import attrs

Rows = list[dict[str, Any]]
_serials = itertools.count(1)


@attrs.frozen
class CacheEntry:
    fetched_at: float  # trio clock
    rows: Rows
    owner: str  # the source that fetched the rows
    go_ready: bool = False  # the rows' numbers are in Go's JSON form (Measurement.go_ready)
    serial: int = attrs.field(factory=lambda: next(_serials))


@attrs.define(eq=False)
class InstanceCache:
    max_age: float = 30.0
    _entries: dict[Hashable, CacheEntry] = attrs.field(factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, key: Hashable, now: float, max_age: float | None = None, *, source: str = "",
            seen: int | None = None) -> CacheEntry | None:
        """The entry if it is younger than max_age (capped by the cache's own max_age), was fetched by
        another source than `source`, and is not the entry `seen` (the one that source delivered last)."""
        limit = self.max_age if max_age is None else min(max_age, self.max_age)
        entry = self._entries.get(key)
        if (entry is None or now - entry.fetched_at >= limit or (source and entry.owner == source)
                or entry.serial == seen):
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: Hashable, now: float, rows: Rows, *, source: str = "", go_ready: bool = False) -> CacheEntry:
        entry = self._entries[key] = CacheEntry(now, rows, source, go_ready)
        if len(self._entries) > 10_000:  # bounded: forget the oldest half
            for k, _ in sorted(self._entries.items(), key=lambda kv: kv[1].fetched_at)[: len(self._entries) // 2]:
                del self._entries[k]
        return entry
