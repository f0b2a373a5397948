"""`reaper reload --plan`, `reaper check --against-running`, and the plan `reaper reload` prints.

The plan comes from reaper.daemon.plan.plan_reload, the function the daemon's reconciler uses to
carry a reload out, run here on the description of the running state that the daemon keeps in its
status file: nothing is signalled, nothing changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import cattrs
from rich.console import Console
from rich.table import Table

from reaper.cli.output import print_json, print_plain
from reaper.config.load import load_config
from reaper.config.redact import remember_secrets
from reaper.daemon.plan import Plan, plan_reload, refused
from reaper.daemon.status import STATUS_FILE, DaemonStatus, read_status_file
from reaper.errors import ConfigError

_converter = cattrs.Converter()


def plan_document(plan: Plan, **about: Any) -> dict[str, Any]:
    document = dict(about)
    document.update(summary=plan.summary(), plan=_converter.unstructure(plan))
    return document


def print_plan(plan: Plan, fmt: str, *, title: str, unchanged: bool = True, **about: Any) -> None:
    """The plan as a table (a terminal), plain tab-separated lines, or one JSON document.

    plain: `plan<TAB>title<TAB>summary`, then `source|sink<TAB>name<TAB>action<TAB>detail`,
    `collector<TAB>key<TAB>old<TAB>new<TAB>at start (true|false)` and `error<TAB>line`."""
    if fmt == "json":
        print_json(plan_document(plan, title=title, **about))
        return
    if fmt == "plain":
        print_plain("plan", title, plan.summary())
        for line in plan.errors:
            print_plain("error", line)
        for p in plan.sources:
            if unchanged or p.action != "unchanged":
                print_plain("source", p.name, p.action, p.detail())
        for k in plan.sinks:
            if unchanged or k.action != "unchanged":
                print_plain("sink", k.label, k.action, "; ".join(c.text() for c in k.settings))
        for c in plan.collector:
            print_plain("collector", c.key, c.old, c.new, c.key in plan.at_start)
        return
    console = Console()
    console.print(f"{title}: [bold]{plan.summary()}[/bold]")
    if plan.errors:
        for line in plan.errors:
            console.print(f"  [red]{line}[/red]", markup=True, highlight=False)
        return
    table = Table(title_justify="left")
    for col in ("", "name", "action", "what changes"):
        table.add_column(col, overflow="fold")
    for p in plan.sources:
        if unchanged or p.action != "unchanged":
            table.add_row("source", p.name, p.action, p.detail() or "-")
    for k in plan.sinks:
        if unchanged or k.action != "unchanged":
            table.add_row("sink", k.label, k.action, "; ".join(c.text() for c in k.settings) or "-")
    for c in plan.collector:
        table.add_row("collector", c.key, "at next start" if c.key in plan.at_start else "applied", c.text())
    console.print(table)


def read_running(state_dir: Path) -> tuple[DaemonStatus | None, str | None]:
    """The daemon's status (with its running state), or why there is none."""
    path = state_dir / STATUS_FILE
    try:
        status = read_status_file(path)
    except FileNotFoundError:
        return None, f"{path}: no status file: is reaper running with this state_dir? (use --config or --state-dir)"
    except (OSError, ValueError, TypeError, KeyError) as e:
        return None, f"{path}: cannot read the status file: {e}"
    if status.running is None:
        return None, (f"{path}: the daemon (reaper {status.version}, pid {status.pid}) does not describe what it "
                      "runs; restart it with this reaper version to plan reloads")
    return status, None


def plan_against_running(config_path: str | None, state_dir: Path, fmt: str) -> int:
    """Print what a reload of `config_path` (default: the daemon's own config file) would do. Exit 0
    when the reload would be applied, 1 when it would be refused or there is no running state."""
    status, problem = read_running(state_dir)
    if status is None or status.running is None:
        print(problem, file=sys.stderr)
        return 1
    try:
        os.kill(status.pid, 0)  # (as reaper.cli.operate.pid_alive, which imports this module)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:
        alive = True
    if not alive:
        print(f"warning: the daemon (pid {status.pid}) is not running; this plan is against the state it "
              "last wrote", file=sys.stderr)
    path = config_path or status.config_path
    try:
        new = load_config(path)
    except ConfigError as e:
        plan = refused(e.problems)
    else:
        for dsn in [s.dsn for s in new.sources] + [getattr(k, "dsn", "") for k in new.sinks]:
            remember_secrets(dsn)
        plan = plan_reload(status.running, new, file_only=True)
    if config_path and Path(config_path).resolve() != Path(status.config_path).resolve():
        print(f"note: the daemon reloads {status.config_path} on SIGHUP, not {config_path}", file=sys.stderr)
    verdict = "would be refused" if plan.errors else "would apply"
    print_plan(plan, fmt, title=f"reload of {path} (pid {status.pid}) {verdict}", config=path, pid=status.pid,
               applied=False, refused=bool(plan.errors))
    return 1 if plan.errors else 0


def check_against_running(config_path: str, state_dir: str | None, config_state_dir: str | None, fmt: str) -> int:
    """`reaper check --against-running`: the plan of reloading `config_path` into its daemon."""
    from reaper.config.schema import default_state_dir

    return plan_against_running(config_path, Path(state_dir or config_state_dir or default_state_dir(config_path)),
                                fmt)
