"""Backup age from pgBackRest and WAL-G: `backup_age_pgbackrest` and `backup_age_walg`.

pgwatch reads these through PL/Python helpers inside the server; reaper runs the tools itself, on the
server's host or through the source's `specials.command_prefix` (reaper.special.tools). Both metrics
give pgwatch's columns: `retcode` (0 when the newest backup could be read and the tool reports no
problem), `backup_age_seconds` (seconds since the newest successful backup finished; null when there
is none to read) and `message` ("OK. ..." or "Not OK. ..." saying what the tool reported).

- pgBackRest: `pgbackrest --output=json [--config=...] [--stanza=...] info`. The stanza is the source's
  `specials.pgbackrest_stanza`, or the only one `info` lists. A stanza status other than ok gives its
  code as retcode and its message (e.g. 1 "missing stanza path", 2 "no valid backups").
- WAL-G: `wal-g backup-list --json --detail [--config ...]` with the variables of
  `specials.walg_env_file` (KEY=VALUE lines) and `specials.walg_env`. The newest `finish_time` (else
  `time`) is the last backup.

A tool that exits non-zero gives its exit code and first error line; one that does not answer within
TOOL_SECONDS gives retcode 124. What makes a metric impossible here (no tool, no permission, no stanza
to choose, an unreadable env file) raises MetricUnavailable: one warning per source, never an error line
per tick, and the tool is not run again for VERDICT_SECONDS (reaper.special.tools.with_verdict). A tool
that answers runs every interval.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from reaper.errors import MetricUnavailable
from reaper.special import Result, SpecialContext
from reaper.special.tools import ToolResult, ToolTimeout, check_where, denied, run_tool, with_verdict

TIMEOUT_RETCODE = 124  # as coreutils' timeout(1)
OWNER_HINT = ("run reaper as the repository's owner (usually postgres) or set the source's "
              "specials.command_prefix, e.g. \"sudo -n -u postgres\"")


def _row(wall_ns: int, retcode: int, age: int | None, message: str) -> dict[str, Any]:
    return {"epoch_ns": wall_ns, "retcode": retcode, "backup_age_seconds": age, "message": message}


def _failed_row(wall_ns: int, tool: str, result: ToolResult) -> dict[str, Any]:
    return _row(wall_ns, result.returncode, None,
                f"Not OK. {tool} failed (exit {result.returncode}): {result.last_error_line()}")


# -- pgBackRest -----------------------------------------------------------------------------------


def pgbackrest_row(stanza: Mapping[str, Any], now: float, wall_ns: int) -> dict[str, Any]:
    """The metric's row for one stanza of `pgbackrest --output=json info`, at unix time `now`."""
    name = stanza.get("name", "?")
    status = stanza.get("status") or {}
    code = int(status.get("code", 99))
    good = [b for b in stanza.get("backup") or []
            if not b.get("error") and isinstance((b.get("timestamp") or {}).get("stop"), int | float)]
    newest = max(good, key=lambda b: b["timestamp"]["stop"], default=None)
    age = max(0, round(now - newest["timestamp"]["stop"])) if newest is not None else None
    running = bool(((status.get("lock") or {}).get("backup") or {}).get("held"))
    last = (f"newest backup {newest.get('label', '?')} ({newest.get('type', '?')}) finished {age} s ago"
            if newest is not None else "no backup")
    if running:
        last += "; a backup is running"
    if code != 0:
        return _row(wall_ns, code, age, f"Not OK. stanza {name}: {status.get('message', 'unknown status')} "
                                        f"(code {code}); {last}")
    if newest is None:  # a status of ok always has a backup; be safe if a version says otherwise
        return _row(wall_ns, 2, None, f"Not OK. stanza {name}: no backup")
    return _row(wall_ns, 0, age, f"OK. stanza {name}: {last}")


async def backup_age_pgbackrest(ctx: SpecialContext) -> Result:
    prefix = await check_where(ctx)
    settings = ctx.source.specials
    argv = ["pgbackrest", "--output=json"]
    if settings.pgbackrest_config:
        argv.append(f"--config={settings.pgbackrest_config}")
    if settings.pgbackrest_stanza:
        argv.append(f"--stanza={settings.pgbackrest_stanza}")
    argv.append("info")
    return await with_verdict(ctx, (*prefix, *argv), lambda: _pgbackrest(ctx, prefix, argv))


async def _pgbackrest(ctx: SpecialContext, prefix: list[str], argv: list[str]) -> tuple[Result, bool]:
    """The metric's result (never kept: a working tool runs every interval), or MetricUnavailable."""
    settings = ctx.source.specials
    table = ctx.metric.table
    try:
        result = await run_tool(ctx, argv, package="pgbackrest", prefix=prefix)
    except ToolTimeout as e:
        return [(table, [_row(ctx.wall_ns, TIMEOUT_RETCODE, None, f"Not OK. {e}")])], False
    if result.returncode != 0:
        if denied(result.stderr):
            raise MetricUnavailable(ctx.metric.name, f"pgbackrest info was refused access "
                                                     f"({result.last_error_line()}); {OWNER_HINT}")
        return [(table, [_failed_row(ctx.wall_ns, "pgbackrest info", result)])], False
    try:
        stanzas = json.loads(result.stdout)
        if not isinstance(stanzas, list) or not all(isinstance(s, dict) for s in stanzas):
            raise ValueError("not a list of stanzas")
    except ValueError as e:
        return [(table, [_row(ctx.wall_ns, 1, None, f"Not OK. cannot read pgbackrest info's output: {e}")])], False
    if not settings.pgbackrest_stanza and len(stanzas) != 1:
        names = ", ".join(str(s.get("name")) for s in stanzas)
        why = (f"pgbackrest info lists {len(stanzas)} stanzas ({names})" if stanzas else
               "pgbackrest info lists no stanza (is pgBackRest configured for this server, and its repository "
               "readable here?)")
        raise MetricUnavailable(ctx.metric.name, f"{why}; set the source's specials.pgbackrest_stanza")
    return [(table, [pgbackrest_row(stanzas[0], time.time(), ctx.wall_ns)])], False


# -- WAL-G ----------------------------------------------------------------------------------------

_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines (`export ` allowed, # comments and blank lines skipped, one pair of matching
    quotes around a value removed). Raises ValueError naming the first line that is neither."""
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if match is None:
            raise ValueError(f"line {number} is not KEY=VALUE")
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[match.group(1)] = value
    return env


def parse_walg_time(text: str) -> dt.datetime:
    """An RFC 3339 time as WAL-G writes it (Go: up to nanoseconds, `Z` or an offset)."""
    match = re.fullmatch(r"(.+?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?", text.strip())
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    base, fraction, zone = match.groups()
    stamp = dt.datetime.fromisoformat(base + (f".{fraction[:6].ljust(6, '0')}" if fraction else ""))
    if zone in (None, "Z"):
        return stamp.replace(tzinfo=dt.UTC)
    offset = dt.datetime.strptime(zone.replace(":", ""), "%z").tzinfo
    return stamp.replace(tzinfo=offset)


def walg_row(backups: list[Any], now: float, wall_ns: int) -> dict[str, Any]:
    """The metric's row for the parsed `wal-g backup-list --json --detail` output, at unix time `now`."""
    finished: list[tuple[float, str]] = []
    for backup in backups:
        if not isinstance(backup, dict):
            return _row(wall_ns, 1, None, "Not OK. cannot read wal-g's output: an entry is not an object")
        stamp = backup.get("finish_time") or backup.get("time")
        if not isinstance(stamp, str):
            continue
        try:
            finished.append((parse_walg_time(stamp).timestamp(), str(backup.get("backup_name", "?"))))
        except ValueError as e:
            return _row(wall_ns, 1, None, f"Not OK. cannot read wal-g's output: {e}")
    if not finished:
        return _row(wall_ns, 1, None, "Not OK. wal-g lists no backup")
    when, name = max(finished)
    age = max(0, round(now - when))
    return _row(wall_ns, 0, age, f"OK. newest backup {name} finished {age} s ago")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


async def walg_environment(ctx: SpecialContext) -> dict[str, str]:
    settings = ctx.source.specials
    env: dict[str, str] = {}
    if settings.walg_env_file:
        try:
            env.update(parse_env_file(_read_text(settings.walg_env_file)))  # a small local file: inline
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise MetricUnavailable(ctx.metric.name, f"cannot read specials.walg_env_file "
                                                     f"{settings.walg_env_file}: {e}") from e
    env.update(settings.walg_env)
    return env


async def backup_age_walg(ctx: SpecialContext) -> Result:
    prefix = await check_where(ctx)
    settings = ctx.source.specials
    argv = ["wal-g", "backup-list", "--json", "--detail"]
    if settings.walg_config:
        argv += ["--config", settings.walg_config]
    key = (*prefix, *argv, settings.walg_env_file or "", *sorted(f"{k}={v}" for k, v in settings.walg_env.items()))
    return await with_verdict(ctx, key, lambda: _walg(ctx, prefix, argv))


async def _walg(ctx: SpecialContext, prefix: list[str], argv: list[str]) -> tuple[Result, bool]:
    """The metric's result (never kept: a failure may be the storage's, for a while), or MetricUnavailable."""
    env = await walg_environment(ctx)
    table = ctx.metric.table
    try:
        result = await run_tool(ctx, argv, package="WAL-G has no Debian package: install its release binary",
                                prefix=prefix, env=env)
    except ToolTimeout as e:
        return [(table, [_row(ctx.wall_ns, TIMEOUT_RETCODE, None, f"Not OK. {e}")])], False
    if result.returncode != 0:
        return [(table, [_failed_row(ctx.wall_ns, "wal-g backup-list", result)])], False
    text = result.stdout.strip()
    try:
        backups = json.loads(text) if text else []  # no backup: WAL-G may print nothing at all
        if not isinstance(backups, list):
            raise ValueError("not a list of backups")
    except ValueError as e:
        return [(table, [_row(ctx.wall_ns, 1, None, f"Not OK. cannot read wal-g's output: {e}")])], False
    return [(table, [walg_row(backups, time.time(), ctx.wall_ns)])], False
