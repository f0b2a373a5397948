"""What each metric needs from a server: functions, relations, settings, extensions, a host, a tool.

Pure. The functions a metric calls and the relations it reads are derived from its SQL with the one
lexer (reaper.catalog.sqltext: comments and string literals never count); `current_setting('x')`
names come from the string literal after the call. A few needs no SQL text shows are explicit
overrides below: the extension a relation or function belongs to, the libraries that must be in
`shared_preload_libraries`, the server settings without which a metric yields nothing (or only part
of its data), and what the special metrics (reaper's own code) need.

Which of those needs a given role on a given server meets is for `reaper check --connect`
(reaper.cli.preflight) to ask the server's catalog (reaper.db.privileges).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import attrs

from reaper.catalog.sqltext import COMMENT, LINE, OTHER, STRING, WS, code_of, lex
from reaper.config.schema import MetricDef
from reaper.special.registry import REGISTRY

# The extension a function or relation belongs to (the SQL shows the name, not the extension).
EXTENSION_OF: Mapping[str, str] = {
    "pg_stat_statements": "pg_stat_statements",
    "pg_stat_statements_info": "pg_stat_statements",
    "pg_buffercache": "pg_buffercache",
    "pgstattuple": "pgstattuple",
    "pgstattuple_approx": "pgstattuple",
    "pg_qualstats": "pg_qualstats",
    "pg_qualstats_index_advisor": "pg_qualstats",
}
# Extensions that work only when their library is in shared_preload_libraries (a restart).
PRELOAD = frozenset({"pg_stat_statements", "pg_qualstats", "pg_stat_kcache", "pg_wait_sampling"})
# Relations whose other roles' rows (or query texts) are hidden without pg_read_all_stats.
STATS_VISIBILITY = frozenset({"pg_stat_activity", "pg_stat_statements", "pg_stat_replication"})


@attrs.frozen
class SettingNeed:
    """A server setting the metric needs: `accepted` values (lower case); `partial` when the metric
    still collects without it (only some of its data)."""

    name: str
    accepted: tuple[str, ...]
    want: str  # the value to set, as written in postgresql.conf
    partial: bool = False
    restart: bool = False
    contains: bool = False  # accepted when the (comma-separated list) value contains one of `accepted`


_TRACK_FUNCTIONS = SettingNeed("track_functions", ("pl", "all"), "pl")
_TRACK_IO = SettingNeed("track_io_timing", ("on",), "on", partial=True)
_LOGGING = (SettingNeed("logging_collector", ("on",), "on", restart=True),
            SettingNeed("log_destination", ("csvlog",), "csvlog", contains=True))

SETTING_NEEDS: Mapping[str, tuple[SettingNeed, ...]] = {
    "sproc_stats": (_TRACK_FUNCTIONS,),
    "stat_statements": (_TRACK_IO,),
    "stat_statements_no_query_text": (_TRACK_IO,),
    "server_log_event_counts": _LOGGING,
}

# Host tools of special metrics: (program, package).
TOOLS: Mapping[str, tuple[str, str]] = {
    "backup_age_pgbackrest": ("pgbackrest", "Debian package pgbackrest"),
    "backup_age_walg": ("wal-g", "WAL-G's release binary; no Debian package"),
    "smart_health_per_disk": ("smartctl", "Debian package smartmontools"),
}
# Special metrics that run shipped SQL metrics (their needs are those metrics').
RUNS_METRICS: Mapping[str, tuple[str, ...]] = {
    "change_events": ("sproc_hashes", "table_hashes", "index_hashes", "configuration_hashes", "privilege_changes"),
}
# What special metrics read from the server themselves.
_HOST_SETTINGS = frozenset({"data_directory", "log_directory"})  # reaper.special.osmetrics.server_paths
_LOG_REMOTE_FUNCTIONS = frozenset({"pg_ls_logdir", "pg_read_binary_file", "pg_read_file"})

_KEYWORD_TEXT = """all and any as between bit by case cast char character coalesce else end exists extract
filter from group having in inner interval is join lateral left like materialized not null numeric or order
outer over overlay partition position right rollup row select some substring then time timestamp trim union
using values varchar when where window with within"""
_KEYWORDS = frozenset(_KEYWORD_TEXT.split())  # words followed by "(" that are no function calls


@attrs.frozen
class Needs:
    """What one metric needs on one server (major version)."""

    functions: frozenset[str] = frozenset()  # names called (lower case)
    relations: frozenset[str] = frozenset()  # names read (lower case, perhaps schema-qualified)
    settings: frozenset[str] = frozenset()  # current_setting() names: must be visible to the role
    extensions: tuple[str, ...] = ()
    server_settings: tuple[SettingNeed, ...] = ()
    local_only: bool = False  # reads the host: reaper must run on the server's host
    tool: tuple[str, str] | None = None  # (program, package)
    remote_functions: frozenset[str] = frozenset()  # needed only when reaper is not on the host
    no_sql: bool = False  # no SQL for this major version

    def merged(self, other: Needs) -> Needs:
        return Needs(functions=self.functions | other.functions, relations=self.relations | other.relations,
                     settings=self.settings | other.settings,
                     extensions=tuple(dict.fromkeys(self.extensions + other.extensions)),
                     server_settings=tuple(dict.fromkeys(self.server_settings + other.server_settings)),
                     local_only=self.local_only or other.local_only, tool=self.tool or other.tool,
                     remote_functions=self.remote_functions | other.remote_functions,
                     no_sql=self.no_sql or other.no_sql)


def sql_needs(sql: str) -> Needs:
    """Functions called, relations read and settings read by one SQL text."""
    code = code_of(sql).names
    functions = {f.lower() for f in re.findall(r"\b([A-Za-z_][\w$]*)\s*\(", code)} - _KEYWORDS
    relations = {r.lower() for r in re.findall(
        r"\b(?:from|join)\s+((?:[A-Za-z_]\w*\s*\.\s*)?[A-Za-z_]\w*)(?!\s*\()", code, re.IGNORECASE)}
    relations = {re.sub(r"\s+", "", r) for r in relations} - _KEYWORDS
    extensions = [EXTENSION_OF[n] for n in sorted(functions | relations) if n in EXTENSION_OF]
    return Needs(functions=frozenset(functions), relations=frozenset(relations),
                 settings=frozenset(settings_read(sql)), extensions=tuple(dict.fromkeys(extensions)))


def settings_read(sql: str) -> set[str]:
    """The names in `current_setting('name'...)` calls (a literal name only)."""
    found = set()
    recent = ""  # the code just before this token, comments and whitespace left out
    for kind, text in lex(sql).tokens:
        if kind == STRING and re.search(r"\bcurrent_setting\s*\(\s*$", recent, re.IGNORECASE):
            found.add(text[1:-1].replace("''", "'").lower())
        if kind == OTHER:
            recent = (recent + text)[-40:]
        elif kind in (WS, COMMENT, LINE):
            recent += " "
        else:
            recent = ""
    return found


def metric_needs(metric: MetricDef, major: int, metrics: Mapping[str, MetricDef] | None = None) -> Needs:
    """What `metric` needs on a server of this major version (`metrics`: to look up what a special
    metric runs)."""
    settings = SETTING_NEEDS.get(metric.name, ())
    base = Needs(extensions=tuple(metric.requires_extension), server_settings=settings)
    if metric.special:
        entry = REGISTRY.get(metric.name)
        if entry is not None and entry.local_only:
            base = base.merged(Needs(local_only=True, settings=_HOST_SETTINGS, tool=TOOLS.get(metric.name)))
        if metric.name == "server_log_event_counts":
            base = base.merged(Needs(settings=_HOST_SETTINGS, remote_functions=_LOG_REMOTE_FUNCTIONS))
        for name in RUNS_METRICS.get(metric.name, ()):
            if metrics and name in metrics:
                base = base.merged(metric_needs(metrics[name], major, metrics))
        return base
    sql = metric.sql_for(major)
    if sql is None:
        return attrs.evolve(base, no_sql=True)
    return base.merged(sql_needs(sql))


def names_to_check(needs: Iterable[Needs]) -> tuple[set[str], set[str], set[str], set[str]]:
    """Every function, relation, setting and extension name the server is asked about."""
    functions: set[str] = set()
    relations: set[str] = set()
    settings: set[str] = set()
    extensions: set[str] = set()
    for n in needs:
        functions |= n.functions | n.remote_functions
        relations |= n.relations
        settings |= n.settings | {s.name for s in n.server_settings} | {"shared_preload_libraries"}
        extensions |= set(n.extensions)
    return functions, relations, settings, extensions
