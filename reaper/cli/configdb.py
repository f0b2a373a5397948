"""`reaper config-db init` and `reaper import-pgwatch sources --from-db`: pgwatch's config database.

Light at import (argparse only): the database code is imported when a command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

DSN_HELP = ("pgwatch's config database (a postgresql:// URI or libpq's key=value string). Keep the password "
            "out of it (a command line is "
            "visible to every user in `ps`): write ${NAME} to take it from the environment variable NAME, or "
            "use --password-file, or libpq's PGPASSWORD / PGPASSFILE (~/.pgpass)")
DEADLINE_SECONDS = 60.0


def add_parser(verbs: Any) -> None:
    """The `config-db` verb."""
    cdb = verbs.add_parser("config-db", help="pgwatch's config database (the sources [[sources_from]] reads)",
                           description="pgwatch's config database: the table pgwatch.source that [[sources_from]] "
                                       "reads, shared by reaper and pgwatch.")
    cverbs = cdb.add_subparsers(dest="config_db_verb", metavar="ACTION")
    cinit = cverbs.add_parser("init", help="create pgwatch's config schema",
                              description="Create pgwatch v3's config schema (schema pgwatch: tables source, "
                                          "preset, metric, migration) in an existing database, with reaper's "
                                          "presets in pgwatch.preset, so that reaper's [[sources_from]] and "
                                          "pgwatch can share it. A database that has pgwatch.source already is "
                                          "left as it is.")
    cinit.add_argument("--dsn", required=True, help=DSN_HELP)
    cinit.add_argument("--password-file", metavar="FILE",
                       help="read the password from this file (its first line; keep it 0600)")


def dsn_argument(value: str, what: str, verb: str) -> str:
    """A command line's dsn (`storage init --dsn`, `config-db init --dsn`, `--from-db`): a warning when it holds a
    literal password, ${NAME} expanded, libpq's key=value form taken as its URI; a ConfigError line otherwise."""
    from reaper.config.load import expand_env
    from reaper.config.redact import dsn_secrets, remember_secrets
    from reaper.config.rules import DSN_EXPECTED, FieldValueError, uri_dsn
    from reaper.errors import ConfigError

    if dsn_secrets(re.sub(r"\$\{\w+\}", "", value)):  # as typed: a literal password, not a ${NAME}
        print(f"{verb}: warning: {what} holds a password, which `ps` shows to every user; use ${{NAME}}, "
              "--password-file or PGPASSWORD instead", file=sys.stderr)
    dsn, missing = expand_env(value, os.environ)
    remember_secrets(dsn)
    if missing:
        raise ConfigError([f"{what}: environment variable {name} is not set" for name in missing])
    try:
        dsn = uri_dsn(dsn)
    except FieldValueError as e:
        raise ConfigError([f"{what}: {e}"]) from None
    if not re.match(r"^postgres(ql)?://", dsn):
        raise ConfigError([f"{what}: {DSN_EXPECTED}"])
    return dsn


def _run(work: Any) -> Any:
    """Run `work()` (a coroutine function using reaper.db) under a deadline; an error is returned."""
    import trio

    from reaper import db
    from reaper.errors import SourceUnavailable

    async def main() -> Any:
        async with db.open_loop():
            try:
                with trio.fail_after(DEADLINE_SECONDS):
                    return await work()
            except (SourceUnavailable, trio.TooSlowError) as e:
                return e  # returned, not raised: the loop's nurseries would wrap it in a group

    return trio.run(main)


def cmd_config_db(args: argparse.Namespace) -> int:
    from reaper.catalog.metrics import Catalog
    from reaper.config.redact import redact_dsn
    from reaper.db.configdb import init_config_db

    if args.config_db_verb is None:
        print("usage: reaper config-db init --dsn DSN", file=sys.stderr)
        return 2
    dsn = dsn_argument(args.dsn, "--dsn", "config-db")
    catalog = Catalog.for_config()
    presets = [(name, preset.description or name, dict(preset.metrics))
               for name, preset in sorted(catalog.presets.items())]
    result = _run(lambda: init_config_db(dsn, presets, password_file=args.password_file))
    if isinstance(result, BaseException):
        print(f"config-db {redact_dsn(dsn)}: {result or f'timed out after {DEADLINE_SECONDS:g}s'}", file=sys.stderr)
        return 1
    print(f"config-db {redact_dsn(dsn)}: {result}")
    return 0


def import_from_db(value: str, password_file: str | None) -> Any:
    """The ImportResult for `import-pgwatch sources --from-db`; raises ConfigError when it cannot be read."""
    from reaper.catalog.pgwatch.sources import import_source_rows
    from reaper.config.redact import redact_dsn
    from reaper.db.configdb import read_source_rows
    from reaper.errors import ConfigError

    dsn = dsn_argument(value, "--from-db", "import-pgwatch")
    rows = _run(lambda: read_source_rows(dsn, password_file=password_file))
    if isinstance(rows, BaseException):
        raise ConfigError([f"{redact_dsn(dsn)}: {rows or f'timed out after {DEADLINE_SECONDS:g}s'}"])
    return import_source_rows(rows, redact_dsn(dsn))
