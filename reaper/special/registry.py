"""The one table of special metrics: which code collects each, where it runs, how long it may take.

Pure data (no handler is imported here): the catalogue and the pgwatch importer read it to know
which metric names reaper collects with its own code, and `reaper.special.special_spec` imports a
handler's module only when a source actually uses that metric (so psutil and friends are loaded
only then). A metric that `presets/` marks `special = true` but that has no entry with a handler
here is reported once per source as "not collected by this version of reaper" and skipped.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class SpecialEntry:
    name: str
    # "module:function" of the handler `async (SpecialContext) -> Result`; "source" when the source's
    # own loop emits it (instance_up); None when this version of reaper has no collector for it.
    collector: str | None
    local_only: bool = False  # needs reaper on the server's host (OS metrics, local files)
    deadline_seconds: float = 60.0
    pgwatch_special: bool = False  # pgwatch collects it with its own code too (its SQL, if any, is not used)

    @property
    def collected(self) -> bool:
        return self.collector is not None


_OS = "reaper.special.osmetrics"

ENTRIES: tuple[SpecialEntry, ...] = (
    SpecialEntry("instance_up", "source", pgwatch_special=True),
    SpecialEntry("change_events", "reaper.special.changes:change_events", deadline_seconds=120,
                 pgwatch_special=True),
    SpecialEntry("server_log_event_counts", "reaper.special.serverlog:server_log_event_counts",
                 deadline_seconds=120, pgwatch_special=True),
    SpecialEntry("cpu_load", f"{_OS}:cpu_load", local_only=True, deadline_seconds=15),
    SpecialEntry("psutil_cpu", f"{_OS}:psutil_cpu", local_only=True, deadline_seconds=15),
    SpecialEntry("psutil_mem", f"{_OS}:psutil_mem", local_only=True, deadline_seconds=15),
    SpecialEntry("psutil_disk", f"{_OS}:psutil_disk", local_only=True, deadline_seconds=15),
    SpecialEntry("psutil_disk_io_total", f"{_OS}:psutil_disk_io_total", local_only=True, deadline_seconds=15),
    SpecialEntry("vmstat", f"{_OS}:vmstat", local_only=True, deadline_seconds=15),
    # Shipped as special metrics (pgwatch reads them through PL/Python helpers) but not collected yet.
    SpecialEntry("smart_health_per_disk", None, local_only=True),
    SpecialEntry("backup_age_pgbackrest", None, local_only=True),
    SpecialEntry("backup_age_walg", None, local_only=True),
)
REGISTRY: dict[str, SpecialEntry] = {entry.name: entry for entry in ENTRIES}

# Names reaper collects with its own code (never with SQL, whatever a definition says).
COLLECTED = frozenset(entry.name for entry in ENTRIES if entry.collected)
# Names pgwatch also collects with its own code: the importer drops their SQL.
PGWATCH_SPECIAL = frozenset(entry.name for entry in ENTRIES if entry.pgwatch_special)
