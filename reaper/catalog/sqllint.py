"""The read-only rule for metric SQL: no statement that writes, no function with side effects.

`reaper check`, `run` and a reload refuse a metric (shipped or a config's own) whose SQL could change
the monitored server: a data-modifying statement anywhere (top level or in a CTE), `SELECT ... INTO`,
a row lock (`FOR UPDATE/SHARE`), or a call of a function that changes settings, signals or ends
backends, consumes sequence values or transaction ids, takes advisory locks, writes large objects or
files, switches WAL, creates or drops slots, resets statistics, or talks to another server (dblink).
Only code counts: comments, string literals, dollar quotes and quoted identifiers are skipped (a column
named "delete_cnt" or a literal 'drop' is fine), but a function called by a quoted name is still seen.
This is a check on what the operator wrote, not the guard itself: every statement also runs inside a
read-only transaction.
"""

from __future__ import annotations

import re

from reaper.catalog.sqltext import code_of

# Statements (as whole words in code) that write, lock or change the session.
WRITE_STATEMENTS = ("insert", "update", "delete", "merge", "copy", "create", "drop", "alter", "truncate",
                    "grant", "revoke", "lock", "call", "do", "set", "reset", "into", "notify", "listen",
                    "vacuum", "analyze", "analyse", "cluster", "reindex", "refresh", "discard", "prepare",
                    "execute")
_WRITE_RE = re.compile(r"\b(" + "|".join(WRITE_STATEMENTS) + r")\b", re.IGNORECASE)
_ROW_LOCK_RE = re.compile(r"\bfor\s+(no\s+key\s+update|update|key\s+share|share)\b", re.IGNORECASE)

# Functions with side effects (pg_sleep and the pg_read_* readers are fine).
SIDE_EFFECT_FUNCTIONS = (
    r"set_config", r"pg_terminate_backend", r"pg_cancel_backend", r"pg_reload_conf", r"pg_rotate_logfile\w*",
    r"nextval", r"setval", r"dblink\w*", r"lo_\w+", r"pg_advisory\w*", r"pg_try_advisory\w*", r"pg_notify",
    r"pg_switch_wal", r"pg_switch_xlog", r"pg_create_\w+", r"pg_drop_\w+", r"pg_promote",
    r"pg_log_backend_memory_contexts", r"pg_stat_reset\w*", r"\w+_reset", r"txid_current", r"pg_current_xact_id",
    r"pg_replication_slot_advance", r"pg_copy_\w+_slot", r"pg_logical_slot_get_\w+", r"pg_logical_emit_message",
    r"pg_replication_origin_(create|drop|advance|session_setup|session_reset|xact_setup|xact_reset)",
    r"pg_wal_replay_(pause|resume)", r"pg_xlog_replay_(pause|resume)", r"pg_file_(write|rename|unlink|sync)",
    r"pg_backup_(start|stop)", r"pg_start_backup", r"pg_stop_backup", r"pg_import_system_collations",
    # index and visibility-map maintenance: they write pages (and WAL) even in a read-only transaction
    r"brin_summarize_\w+", r"brin_desummarize_range", r"gin_clean_pending_list", r"pg_truncate_visibility_map",
)
# A name (possibly schema-qualified, so preceded by '.') followed by '(' is a call.
_CALL_RE = re.compile(r"(?<![\w$])(" + "|".join(SIDE_EFFECT_FUNCTIONS) + r")\s*\(", re.IGNORECASE)


def write_problems(sql: str) -> list[str]:
    """One line per kind of side effect found in one SQL text ([] when it only reads)."""
    code = code_of(sql)
    problems: list[str] = []
    functions = sorted({m.group(1).lower() for m in _CALL_RE.finditer(code.names)})
    if functions:
        problems.append(f"calls {'a function' if len(functions) == 1 else 'functions'} with side effects: "
                        f"{', '.join(functions)} (metric SQL must only read)")
    found = [m.group(1).lower() for m in _WRITE_RE.finditer(code.text)]
    locks = [" ".join(m.group(1).lower().split()) for m in _ROW_LOCK_RE.finditer(code.text)]
    for lock in locks:  # `for update` is a row lock, not an UPDATE statement
        if lock.split()[-1] in found:
            found.remove(lock.split()[-1])
    words = set(found) | {f"for {lock}" for lock in locks}
    if words & {"update", "merge"}:  # UPDATE ... SET and MERGE ... INTO name no statement of their own
        words -= {"set", "into"}
    if "into" in words:  # INSERT INTO / MERGE INTO are named by their verb; otherwise SELECT ... INTO
        words.discard("into")
        if not words & {"insert", "merge"}:
            words.add("select ... into")
    if words:
        problems.append(f"writes or changes state: {', '.join(sorted(words))} (metric SQL must be one read-only "
                        "SELECT or WITH query; outside comments and literals)")
    return problems
