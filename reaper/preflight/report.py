"""Printing `reaper check --connect` (text, plain lines, JSON) and writing the fleet's fixing SQL script."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from reaper.cli.output import print_json, print_plain
from reaper.preflight import SourceReport
from reaper.preflight.judge import COLLECT, FAILS, SKIP, summary

if TYPE_CHECKING:
    from reaper.db.storage_check import StorageCheck


def source_line(r: SourceReport) -> str:
    if not r.reachable:
        return f"{r.name}: unreachable: {r.error}"
    if r.kind != "postgres" and not r.role:
        return f"{r.name}: reachable, {r.version} ({r.kind}: its console's metrics need no privileges)"
    state = "in recovery (standby)" if r.in_recovery else "primary"
    roles = "superuser" if r.superuser else ("member of " + ", ".join(r.memberships) if r.memberships
                                             else "member of no role")
    pooler = (" through a connection pooler (statement timeouts kept by reaper, no prepared statements, the server"
              " session's own search_path)" if r.pooler else "")
    risk = ("; a superuser through a pooler runs the metrics under the server session's own search_path: "
            "connect as a pg_monitor role (README: The monitoring role)" if r.pooler and r.superuser else "")
    return (f"{r.name}: reachable, PostgreSQL {r.version}{pooler}, {state}, database {r.database}, "
            f"role {r.role} ({roles}){risk}{absent_line(r)}")


def absent_line(r: SourceReport) -> str:
    return (f"; its search_path names schemas this database lacks: {', '.join(r.absent_schemas)}"
            if r.absent_schemas else "")


def print_report(reports: list[SourceReport], fmt: str, storages: Sequence[StorageCheck] = ()) -> None:
    if fmt == "json":
        print_json({"sources": [as_json(r) for r in reports], "sql": fix_script(reports).splitlines(),
                    "sinks": [attrs.asdict(c) for c in storages]})
        return
    for r in reports:
        if fmt == "plain":
            print_plain("source", r.name, "reachable" if r.reachable else "unreachable", r.error or r.version,
                        "" if r.in_recovery is None else ("standby" if r.in_recovery else "primary"), r.role,
                        "superuser" if r.superuser else ",".join(r.memberships))
            if r.absent_schemas:
                print_plain("note", r.name, absent_line(r).removeprefix("; "))
            for v in r.verdicts:
                print_plain("metric", r.name, v.metric, v.status, "; ".join(v.reasons), " ".join(v.fixes))
            if r.reachable and r.verdicts:
                print_plain("summary", r.name, summary(r.name, r.verdicts))
            continue
        print(source_line(r))
        for v in r.verdicts:
            if v.status == COLLECT:
                print(f"  {v.metric}: will collect")
                continue
            what = {SKIP: "skipped", FAILS: "will fail"}.get(v.status, "collects only partly")
            fixes = f" -> {' '.join(v.fixes)}" if v.fixes else ""
            print(f"  {v.metric}: {what}: {'; '.join(v.reasons)}{fixes}")
        if r.reachable and r.verdicts:
            print(summary(r.name, r.verdicts))
    print_storages(storages, fmt)


def storage_line(c: StorageCheck) -> str:
    return f"sink {c.label}: " + (f"reachable, {c.detail}" if c.reachable else f"unreachable: {c.error}")


def print_storages(storages: Sequence[StorageCheck], fmt: str) -> None:
    """Each postgres sink: plain `sink<TAB>label<TAB>ok|problem|unreachable<TAB>detail<TAB>problems<TAB>fixes`."""
    for c in storages:
        if fmt == "plain":
            state = "unreachable" if not c.reachable else ("problem" if c.problems else "ok")
            print_plain("sink", c.label, state, c.detail or c.error, "; ".join(c.problems), " ".join(c.fixes))
            continue
        print(storage_line(c))
        for problem in c.problems:
            print(f"  {problem}")
        for fix in c.fixes:
            print(f"  -> {fix}")


def as_json(r: SourceReport) -> dict[str, Any]:
    return {"name": r.name, "kind": r.kind, "reachable": r.reachable, "error": r.error or None,
            "version": r.version or None, "major": r.major or None, "in_recovery": r.in_recovery,
            "database": r.database or None, "pooler": r.pooler,
            "search_path": r.search_path, "absent_schemas": list(r.absent_schemas), "role": r.role or None,
            "superuser": r.superuser,
            "memberships": list(r.memberships),
            "metrics": [{"metric": v.metric, "status": v.status, "reasons": list(v.reasons), "fixes": list(v.fixes)}
                        for v in r.verdicts],
            "summary": summary(r.name, r.verdicts) if r.reachable and r.verdicts else None}


_GRANT_ROLE = re.compile(r"GRANT (\w+) TO (\S+);")


def fix_script(reports: list[SourceReport]) -> str:
    """One psql script with every statement the fleet needs, as a superuser: `\\connect`s to each
    server and database, role GRANTs once per server (a role already given by a larger predefined role
    that the script also grants is left out), then per database its GRANT EXECUTE / CREATE EXTENSION,
    then the settings (ALTER SYSTEM; a restart where a comment says so)."""
    servers: dict[tuple[str, int], dict[str, list[str]]] = {}
    includes: dict[tuple[str, int], dict[str, tuple[str, ...]]] = {}
    for r in reports:
        key = (r.host, r.port)
        per_db = servers.setdefault(key, {})
        includes.setdefault(key, {}).update(r.includes)
        for v in r.verdicts:
            if v.status == COLLECT:
                continue
            for fix in v.fixes:
                statements = per_db.setdefault(r.database, [])
                if fix not in statements:
                    statements.append(fix)
    lines = ["-- reaper check --connect: what the monitoring role needs, fleet-wide. Run as a superuser:",
             "--   psql -X -v ON_ERROR_STOP=1 -f THIS_FILE"]
    if not any(servers.values()):
        lines.append("-- nothing to do: every metric of every reachable source will collect")
        return "\n".join(lines) + "\n"
    for (host, port), per_db in servers.items():
        if not per_db:
            continue
        granted = {m.group(1) for fixes in per_db.values() for f in fixes if (m := _GRANT_ROLE.fullmatch(f))}
        implied = {inner for role in granted for inner in includes[(host, port)].get(role, ())}
        done_roles: set[str] = set()
        lines.append(f"\n-- server {host or '(default)'}:{port}")
        settings: list[str] = []
        for database, fixes in per_db.items():
            lines.append(f"\\connect {_psql_arg(database)} - {_psql_arg(host) if host else '-'} {port}")
            for fix in fixes:
                m = _GRANT_ROLE.fullmatch(fix)
                if m and (m.group(1) in implied or fix in done_roles):
                    continue
                if m:
                    done_roles.add(fix)
                if fix.startswith("ALTER SYSTEM"):
                    if fix not in settings:
                        settings.append(fix)
                    continue
                lines.append(fix)
        lines.extend(settings)
    return "\n".join(lines) + "\n"


def _psql_arg(value: str) -> str:
    return value if re.fullmatch(r"[\w.\-/]+", value) else "'" + value.replace("'", "\\'") + "'"
