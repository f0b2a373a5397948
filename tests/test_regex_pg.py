"""A discovery source's include_pattern / exclude_pattern, checked offline as PostgreSQL would take it.

The server matches them (`datname ~ pattern`). A typo (`^app_(prod`) was found only when the daemon listed the
databases: `reaper check` said ok, a start collected nothing, a reload was applied and its discovery failed.
reaper.config.regex now judges a pattern offline. PostgreSQL's regular expressions are not Python's, so the
scanner is compared here with a real server: on thousands of random patterns it must never refuse one the
server accepts, and must find most of those the server refuses; then from outside, `check` and a reload.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import psycopg
import pytest
from pgserver import ServerHandle
from test_daemon import REAPER, Daemon, wait_until

from reaper.config.regex import are_problem

pytestmark = pytest.mark.pg

# pieces of patterns: PostgreSQL's own syntax (constraint escapes, classes, directors, embedded options) and
# the usual slips (a group left open, a quantifier with nothing before it, Python's named group)
SYNTAX = [*"()[]{}*+?|\\^$.,:=!<#-", "(?:", "(?=", "(?!", "(?<=", "(?<!", "(?#c)", "[[:alpha:]]", "[[:digit:]",
          "{2}", "{1,3}", "{,2}", "{300}", "{3,1}", "\\m", "\\M", "\\y", "\\d", "\\c", "\\.", "(?i)", "(?x)", "(?b)",
          "***:", "***=", "[^", "[]a]", "[^]]", "[a-z]", "(?P<n>", " "]
NAMES = [*"abc_dx1"]  # database names' characters, weighted up in the second mix


def server_errors(server: ServerHandle, patterns: list[str]) -> dict[str, str | None]:
    """Each pattern -> PostgreSQL's error for `'' ~ pattern`, or None when it takes it."""
    with psycopg.connect(server.dsn()) as conn:
        conn.execute("create function pg_temp.regex_error(p text) returns text language plpgsql as $$"
                     " begin perform '' ~ p; return null; exception when others then return sqlerrm; end $$")
        rows = conn.execute("select p, pg_temp.regex_error(p) from unnest(%s::text[]) as p", (patterns,)).fetchall()
    return dict(rows)


@pytest.mark.parametrize("mix", ["syntax", "names"])
def test_the_offline_check_never_refuses_what_postgresql_accepts(pg15: ServerHandle, mix: str) -> None:
    """The same patterns at every run (CI must not turn red on a draw); REAPER_TEST_REGEX_SEED=random draws new
    ones, as was done for this scanner over half a million patterns (each refused one named with its seed)."""
    chosen = os.environ.get("REAPER_TEST_REGEX_SEED", "")
    seed = int.from_bytes(os.urandom(4), "big") if chosen == "random" else int(chosen or 2931769789)
    rnd = random.Random(seed)
    pieces = SYNTAX if mix == "syntax" else NAMES * 8 + SYNTAX
    patterns = sorted({"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 12))) for _ in range(8000)})
    errors = server_errors(pg15, patterns)
    wrong = [(p, are_problem(p)) for p in patterns if errors[p] is None and are_problem(p) is not None]
    assert not wrong, f"seed {seed}: refused, the server takes them: {wrong[:10]}"
    refused = [p for p in patterns if errors[p] is not None]
    found = [p for p in refused if are_problem(p) is not None]
    assert len(found) >= 0.9 * len(refused), (seed, len(found), len(refused),
                                               [(p, errors[p]) for p in refused if p not in found][:10])


def test_the_usual_slips_are_found_and_postgresqls_own_syntax_is_taken(pg15: ServerHandle) -> None:
    slips = ["^app_(prod", "^app_prod)", "*_test$", "^(?P<env>prod)_", "^db[0-9", "^a{2,1}$", "^x{1,", "ab\\",
             "^(a|*b)$", "^a**$"]
    valid = ["^app_(prod|stage)$", "\\mapp\\M", "^[[:alpha:]_][[:alnum:]_]*$", "***=a(b", "(?i)^APP_", "^a{2}b{1,}$",
             "^(?:x|y)+?$", "[]x]", "^$", "^(?!template)", "(?<=_)prod$", "^a.*b$", "^db[0-9]{2}$"]
    errors = server_errors(pg15, slips + valid)
    assert all(errors[p] is not None for p in slips), errors  # (the server's verdicts, for the record)
    assert all(errors[p] is None for p in valid), errors
    assert [p for p in slips if are_problem(p) is None] == []
    assert [(p, are_problem(p)) for p in valid if are_problem(p) is not None] == []


def test_check_and_a_reload_refuse_a_pattern_the_server_would_refuse(pg15: ServerHandle, fresh_db: str,
                                                                     tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    prefix = fresh_db[:12]
    discovery = (f'\n[[sources]]\nname = "disc"\nkind = "postgres-discovery"\ndsn = "{pg15.dsn()}"\n'
                 f'include_pattern = "^{prefix}"\nmetrics = {{ ping = 1 }}\n')
    daemon.write_config([], extra=discovery)
    daemon.start()
    try:
        wait_until(lambda: any(d["dbname"] == f"disc_{fresh_db}" for d in daemon.lines()), what="a discovered row")
        daemon.config.write_text(daemon.config.read_text().replace(f'"^{prefix}"', f'"^{prefix}_(prod"'))
        check = subprocess.run([*REAPER, "check", "--config", str(daemon.config)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 1
        lines = check.stderr.strip().splitlines()
        assert len(lines) == 1 and "sources[0].include_pattern" in lines[0] and "never closed" in lines[0], lines
        reload = daemon.reload()
        assert reload.returncode != 0 and "include_pattern" in reload.stdout + reload.stderr
        rows = len(daemon.lines())
        wait_until(lambda: len(daemon.lines()) >= rows + 2, what="rows after the refused reload")
    finally:
        assert daemon.stop() == 0
    log = daemon.log_text()
    assert "discovery failed" not in log and "keeping the running configuration" in log
