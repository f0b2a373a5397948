"""Will a metric collect on this server with this role, and if not, the exact statement that fixes it.

Pure: the metric's needs (reaper.catalog.requirements) against the role's privileges and the server's
settings (reaper.db.privileges.Privileges, read from the catalog). A verdict is `collect`, `partial`
(collects, but some of its data is hidden or zero until the fix) or `skip`, with one reason per
unmet need and the statement for it (a GRANT, a CREATE EXTENSION, an ALTER SYSTEM), or none when no
statement can help (no SQL for this version, not on the server's host, a tool to install).
"""

from __future__ import annotations

import os
import re
import shutil

import attrs

from reaper.catalog.requirements import PRELOAD, STATS_VISIBILITY, Needs, SettingNeed
from reaper.db.privileges import Privileges

COLLECT, PARTIAL, SKIP = "collect", "partial", "skip"
FAILS = "fails"  # the metric's SQL itself fails on the server (reaper.preflight: prepared, never run)
# The smallest predefined role first when several hold a privilege.
_ROLE_ORDER = ("pg_read_all_settings", "pg_read_all_stats", "pg_stat_scan_tables", "pg_monitor",
               "pg_read_server_files")
# server_log_event_counts reads the log files through these overloads when reaper is not on the host.
REMOTE_LOG_SIGNATURES = ("pg_ls_logdir()", "pg_read_binary_file(text,bigint,bigint)")


@attrs.frozen
class Verdict:
    metric: str
    status: str
    reasons: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()  # statements, each ending with ';' (a restart note is an SQL comment)


@attrs.frozen
class Server:
    major: int
    database: str
    is_local: bool  # reaper runs on the server's host (unix socket or a loopback address)
    command_prefix: str = ""  # the source's specials.command_prefix


def ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else '"' + name.replace('"', '""') + '"'


def grant_role(role: str, priv: Privileges) -> str:
    return f"GRANT {role} TO {ident(priv.role)};"


def _role_fix(granted_to: tuple[str, ...], priv: Privileges) -> str | None:
    ranked = sorted(granted_to, key=lambda r: _ROLE_ORDER.index(r) if r in _ROLE_ORDER else len(_ROLE_ORDER))
    return grant_role(ranked[0], priv) if ranked else None


def judge(metric: str, needs: Needs, priv: Privileges, server: Server) -> Verdict:
    skip: list[tuple[str, str | None]] = []
    partial: list[tuple[str, str | None]] = []
    if needs.no_sql:
        return Verdict(metric, SKIP, (f"no SQL for PostgreSQL {server.major}",))
    preload = priv.settings.get("shared_preload_libraries")
    loaded = {s.strip().strip('"') for s in (preload or "").split(",") if s.strip()}
    missing_ext = set()
    for ext in needs.extensions:
        if ext not in priv.extensions:
            skip.append((f"extension {ext} is not available on the server (install its package there)", None))
            missing_ext.add(ext)
            continue
        if not priv.extensions[ext]:
            skip.append((f"extension {ext} is not installed in database {server.database}",
                         f"CREATE EXTENSION IF NOT EXISTS {ident(ext)};"))
            missing_ext.add(ext)
        if ext in PRELOAD and preload is not None and ext not in loaded:
            value = ",".join([*sorted(loaded), ext])
            skip.append((f"{ext} is not in shared_preload_libraries (it is '{preload}')",
                         f"ALTER SYSTEM SET shared_preload_libraries = '{value}';  -- then restart the server"))
    functions = set(needs.functions)
    if not server.is_local:
        functions |= needs.remote_functions
    text_reader_ok = any(fn.ok for fn in priv.functions.get("pg_read_file", ())
                         if fn.signature == "pg_read_file(text,bigint,bigint)")
    for name in sorted(functions):
        if name == "pg_read_file" or (name == "pg_read_binary_file" and text_reader_ok):
            continue  # the log is read with pg_read_binary_file, or pg_read_file when only that is granted
        for fn in priv.functions.get(name, ()):
            if fn.ok or (name in needs.remote_functions and fn.signature not in REMOTE_LOG_SIGNATURES):
                continue
            fix = _role_fix(fn.granted_to, priv) or f"GRANT EXECUTE ON FUNCTION {fn.signature} TO {ident(priv.role)};"
            skip.append((f"no EXECUTE on {fn.signature}", fix))
    for name in sorted(needs.relations):
        rel = priv.relations.get(name)
        if rel is None:
            continue
        if not rel.some:
            fix = _role_fix(rel.granted_to, priv) or f"GRANT SELECT ON {rel.qualified} TO {ident(priv.role)};"
            skip.append((f"no SELECT on {rel.qualified}", fix))
        elif name in STATS_VISIBILITY and not priv.member_of("pg_read_all_stats"):
            partial.append((f"other roles' rows of {name} are hidden (needs pg_read_all_stats)",
                            grant_role("pg_read_all_stats", priv)))
    for name in sorted(needs.settings):
        if name in priv.settings:
            continue
        if priv.member_of("pg_read_all_settings"):
            skip.append((f"setting {name} does not exist on PostgreSQL {server.major}", None))
        else:
            skip.append((f"may not read the setting {name}", grant_role("pg_read_all_settings", priv)))
    for need in needs.server_settings:
        problem = _setting_problem(need, priv.settings.get(need.name))
        if problem:
            (partial if need.partial else skip).append(problem)
    if needs.local_only or (metric == "server_log_event_counts" and not server.is_local):
        _where(metric, needs, priv, server, skip)
    if not skip and not partial:
        return Verdict(metric, COLLECT)
    both = skip + partial
    fixes = tuple(dict.fromkeys(f for _, f in both if f))
    return Verdict(metric, SKIP if skip else PARTIAL, tuple(r for r, _ in both), fixes)


RESTART = "  -- then restart the server"


def _setting_problem(need: SettingNeed, value: str | None) -> tuple[str, str | None] | None:
    if value is None:
        return None  # not visible: the settings check above names the GRANT
    current = value.lower()
    parts = {p.strip() for p in current.split(",")}
    if (parts & set(need.accepted)) if need.contains else current in need.accepted:
        return None
    want = f"{value},{need.want}" if need.contains and value else need.want
    how = RESTART if need.restart else " SELECT pg_reload_conf();"
    shown = value or "''"
    return (f"needs {need.name} = {want} (it is {shown})", f"ALTER SYSTEM SET {need.name} = '{want}';{how}")


def _where(metric: str, needs: Needs, priv: Privileges, server: Server, skip: list[tuple[str, str | None]]) -> None:
    """Metrics that read the host: reaper on that host (or a command prefix for the tools)."""
    if metric == "server_log_event_counts":
        log_dir = priv.settings.get("log_directory", "")
        data_dir = priv.settings.get("data_directory", "")
        if log_dir.startswith("/") and not log_dir.startswith(data_dir.rstrip("/") + "/") \
                and not priv.member_of("pg_read_server_files"):
            skip.append((f"log_directory {log_dir} is outside the data directory: reading it through the server "
                         "needs pg_read_server_files", grant_role("pg_read_server_files", priv)))
        return
    if needs.tool and server.command_prefix:
        return  # the operator said where the tool runs
    if not server.is_local:
        skip.append(("reaper is not on the server's host (it connects over the network): this metric reads the "
                     "host reaper runs on", None))
        return
    if needs.tool:
        program, package = needs.tool
        if shutil.which(program) is None:
            skip.append((f"{program} is not installed or not on reaper's PATH ({package})", None))
        elif program == "smartctl" and os.geteuid() != 0:
            skip.append(("smartctl needs root (or CAP_SYS_RAWIO): set specials.command_prefix = \"sudo -n\"", None))


def summary(name: str, verdicts: list[Verdict]) -> str:
    """`main: 61 of 70 metrics will collect; 9 need: GRANT ...; CREATE EXTENSION ...`"""
    collect = sum(1 for v in verdicts if v.status in (COLLECT, PARTIAL))
    partial = sum(1 for v in verdicts if v.status == PARTIAL)
    failing = sum(1 for v in verdicts if v.status == FAILS)
    line = f"{name}: {collect} of {len(verdicts)} metrics will collect"
    if partial:
        line += f" ({partial} partly)"
    if failing:
        line += f"; {failing} will fail (their SQL: see above)"
    needing = [v for v in verdicts if v.status in (SKIP, PARTIAL)]
    raw = [f for v in needing for f in v.fixes]
    fixes = list(dict.fromkeys(f.split("  --")[0].strip() for f in raw))
    if needing:
        line += f"; {len(needing)} need: " + (" ".join(fixes) if fixes else "nothing SQL can give (see above)")
        if any(f.endswith(RESTART) for f in raw):  # (a setting that only a restart applies: pg_reload_conf() is not it)
            line += RESTART
    return line
