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
    # "module:function" `(ServerInfo) -> {name: SQL}`: the server reads of one run, when they are plain queries
    # that may ride in the fast lane's statement (reaper.daemon.rides); the handler then gets their outcome
    reads: str | None = None
    how: str = ""  # how it is collected, for docs/metrics.md (reaper.catalog.docs)

    @property
    def collected(self) -> bool:
        return self.collector is not None


_OS = "reaper.special.osmetrics"
_WHERE = ("Runs on the server's host (a unix-socket connection, or the server's pg_control readable here), "
          "or wherever the source's `specials.command_prefix` (e.g. `\"sudo -n -u postgres\"`, "
          "`\"ssh backup-host\"`) runs it. A missing tool or a refused permission is said once per source "
          "(naming the package), never as an error line per tick.")
_PGBACKREST = ("reaper runs `pgbackrest --output=json info` (Debian package `pgbackrest`) as a user that may read "
               "the repository (usually postgres), with `--config=` from `specials.pgbackrest_config` and "
               "`--stanza=` from `specials.pgbackrest_stanza` (unset: the only stanza `info` lists; none or "
               "several is said once). `backup_age_seconds` is the age of the newest backup without errors "
               "(null when there is none); `retcode` is 0, or the stanza's status code (1 missing stanza path, "
               "2 no valid backups...), or pgbackrest's exit code, or 124 after 30 s without an answer; "
               "`message` says which. " + _WHERE)
_WALG = ("reaper runs `wal-g backup-list --json --detail` (WAL-G has no Debian package: its release binary on "
         "the PATH), with `--config` from `specials.walg_config` and the variables of `specials.walg_env_file` "
         "(KEY=VALUE lines) and `specials.walg_env` (e.g. `WALG_S3_PREFIX`); the newest `finish_time` (else "
         "`time`) is the last backup. `retcode` is 0, 1 when no backup is listed, wal-g's exit code, or 124 "
         "after 30 s. Tested with a stand-in executable printing WAL-G's documented JSON "
         "(tests/data/wal-g), not with WAL-G itself. " + _WHERE)
_SMART = ("reaper runs `smartctl --scan-open --json` and then `smartctl --json -H -i` per device (Debian package "
          "`smartmontools`; smartctl needs root, or CAP_SYS_RAWIO and read access to the devices: e.g. "
          "`specials.command_prefix = \"sudo -n\"`). Run here, the whole disks in /sys/block the scan does not "
          "list get a row too. One row per device: `retcode` is smartctl's exit status (pgwatch's column: 0 = "
          "healthy), `health_passed` 1/0 (null when SMART cannot say), `status` passed, FAILED, or "
          "`unsupported: <reason>` (virtual disks) / `not permitted: <reason>`. " + _WHERE)

ENTRIES: tuple[SpecialEntry, ...] = (
    SpecialEntry("instance_up", "source", pgwatch_special=True),
    SpecialEntry("change_events", "reaper.special.changes:change_events", deadline_seconds=120,
                 pgwatch_special=True, reads="reaper.special.changes:reads"),
    SpecialEntry("server_log_event_counts", "reaper.special.serverlog:server_log_event_counts",
                 deadline_seconds=120, pgwatch_special=True),
    SpecialEntry("cpu_load", f"{_OS}:cpu_load", local_only=True, deadline_seconds=15),
    SpecialEntry("psutil_cpu", f"{_OS}:psutil_cpu", local_only=True, deadline_seconds=15),
    SpecialEntry("psutil_mem", f"{_OS}:psutil_mem", local_only=True, deadline_seconds=15),
    SpecialEntry("psutil_disk", f"{_OS}:psutil_disk", local_only=True, deadline_seconds=15),
    SpecialEntry("psutil_disk_io_total", f"{_OS}:psutil_disk_io_total", local_only=True, deadline_seconds=15),
    SpecialEntry("vmstat", f"{_OS}:vmstat", local_only=True, deadline_seconds=15),
    # Host tools (pgwatch runs them from PL/Python helpers in the server): reaper runs them itself, on the
    # server's host or through the source's specials.command_prefix; each tool call has its own deadline
    # (reaper.special.tools.TOOL_SECONDS, smart.DEVICE_SECONDS) inside the entry's.
    SpecialEntry("smart_health_per_disk", "reaper.special.smart:smart_health_per_disk", local_only=True,
                 deadline_seconds=90, how=_SMART),
    SpecialEntry("backup_age_pgbackrest", "reaper.special.backup:backup_age_pgbackrest", local_only=True,
                 deadline_seconds=60, how=_PGBACKREST),
    SpecialEntry("backup_age_walg", "reaper.special.backup:backup_age_walg", local_only=True,
                 deadline_seconds=60, how=_WALG),
)
REGISTRY: dict[str, SpecialEntry] = {entry.name: entry for entry in ENTRIES}

# Names reaper collects with its own code (never with SQL, whatever a definition says).
COLLECTED = frozenset(entry.name for entry in ENTRIES if entry.collected)
# Names pgwatch also collects with its own code: the importer drops their SQL.
PGWATCH_SPECIAL = frozenset(entry.name for entry in ENTRIES if entry.pgwatch_special)
