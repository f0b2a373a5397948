"""The `reaper check --connect` command: run the checks, print them, write the SQL script, exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from reaper.config.schema import Config
from reaper.errors import ConfigError

EXIT_OK, EXIT_FAILURE = 0, 1


def add_connect_arguments(check: argparse.ArgumentParser) -> None:
    check.add_argument("--connect", action="store_true",
                       help="also connect to every source and say, per metric, whether its role will collect "
                            "it, and if not the exact GRANT / CREATE EXTENSION / setting that fixes it (exit 1 "
                            "when a source is unreachable or a metric's SQL fails on it)")
    check.add_argument("--source", "-s", action="append", metavar="NAME",
                       help="with --connect: only this source (repeatable)")
    check.add_argument("--sql-out", metavar="FILE",
                       help="with --connect: write one SQL script of every statement the fleet needs (psql, "
                            "as a superuser)")


def check_connect_command(config: Config, sources: Sequence[str] | None, fmt: str | None,
                          sql_out: str | None) -> int:
    """Exit 0 when every source was reachable and no metric's SQL fails there, 1 otherwise (an unknown --source
    is a config error)."""
    import trio  # the command's modules load only when it runs

    from reaper.cli.output import choose_format
    from reaper.kinds import is_discovery
    from reaper.preflight import check_connect, check_storages
    from reaper.preflight.judge import FAILS
    from reaper.preflight.report import fix_script, print_report

    fmt = choose_format(fmt)
    known = {s.name for s in config.sources}
    finding = any(s.enabled and is_discovery(s) for s in config.sources)  # (their databases' names: found now)
    if (unknown := [n for n in sources or () if n not in known]) and not finding:
        raise ConfigError([f"--source {n}: no such source in the config" for n in unknown])
    from reaper.cli.progress import Progress

    reports = trio.run(check_connect, config, sources, Progress("checked", "sources", "unreachable"))
    if unknown := [n for n in unknown if n not in {r.name for r in reports}]:
        raise ConfigError([f"--source {n}: no such source in the config, nor found by its discovery sources"
                           for n in unknown])
    storages = [] if sources else trio.run(check_storages, config)  # (--source: those sources only)
    print_report(reports, fmt, storages)
    if sql_out:
        try:
            Path(sql_out).write_text(fix_script(reports), encoding="utf-8")
        except OSError as e:
            raise ConfigError([f"{sql_out}: cannot write: {e.strerror or e}"]) from None
        print(f"{sql_out}: written: the statements above, for psql as a superuser", file=sys.stderr)
    unreachable = [r for r in reports if not r.reachable]
    unwritable = [c for c in storages if not c.reachable or c.problems]
    failing = [(r.name, v) for r in reports for v in r.verdicts if v.status == FAILS]  # their SQL: a config's bug
    if fmt != "json":
        for r in unreachable:
            print(f"source {r.name}: unreachable: {r.error}", file=sys.stderr)
        for name, v in failing:
            print(f"source {name}: metric {v.metric}: {'; '.join(v.reasons)}", file=sys.stderr)
        for c in unwritable:
            print(f"sink {c.label}: " + (f"unreachable: {c.error}" if not c.reachable else "; ".join(c.problems)),
                  file=sys.stderr)
    return EXIT_FAILURE if unreachable or unwritable or failing or not reports else EXIT_OK
