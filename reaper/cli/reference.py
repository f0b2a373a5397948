"""`reaper metrics list|show`: the metric catalogue for operators, as tables, plain lines or JSON."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from reaper.catalog.metrics import Catalog
from reaper.cli.output import joined, print_json, print_plain


def presets_using(catalog: Catalog, metric: str) -> list[str]:
    return sorted(name for name, preset in catalog.presets.items() if metric in preset.metrics)


def _versions(catalog: Catalog, name: str) -> list[str]:
    m = catalog.metrics[name]
    return ["special"] if m.special else [f"{v}+" for v in sorted(m.sql)]


def print_metric_list(catalog: Catalog, console: Console | None = None, fmt: str = "table") -> None:
    """Plain: `metric<TAB>name<TAB>versions<TAB>presets<TAB>description` per metric, then
    `preset<TAB>name<TAB>metric:seconds,...<TAB>description` per preset."""
    if fmt == "json":
        print_json({
            "metrics": [{"name": n, "versions": _versions(catalog, n), "presets": presets_using(catalog, n),
                         "description": catalog.metrics[n].description} for n in sorted(catalog.metrics)],
            "presets": [{"name": n, "metrics": dict(sorted(catalog.presets[n].metrics.items())),
                         "description": catalog.presets[n].description} for n in sorted(catalog.presets)],
        })
        return
    if fmt == "plain":
        for name in sorted(catalog.metrics):
            print_plain("metric", name, joined(_versions(catalog, name)), joined(presets_using(catalog, name)),
                        catalog.metrics[name].description)
        for name in sorted(catalog.presets):
            p = catalog.presets[name]
            print_plain("preset", name, joined(f"{m}:{s}" for m, s in sorted(p.metrics.items())), p.description)
        return
    console = console or Console()
    table = Table(title=f"{len(catalog.metrics)} metrics", title_justify="left")
    for col in ("metric", "versions", "presets", "description"):
        table.add_column(col, overflow="fold")
    for name in sorted(catalog.metrics):
        table.add_row(name, ", ".join(_versions(catalog, name)), ", ".join(presets_using(catalog, name)),
                      catalog.metrics[name].description)
    console.print(table)
    presets = Table(title=f"{len(catalog.presets)} presets", title_justify="left")
    for col in ("preset", "metrics", "description"):
        presets.add_column(col, overflow="fold")
    for name in sorted(catalog.presets):
        p = catalog.presets[name]
        presets.add_row(name, " ".join(f"{m}:{s}" for m, s in sorted(p.metrics.items())), p.description)
    console.print(presets)


def _facts(catalog: Catalog, name: str) -> dict[str, Any]:
    m = catalog.metrics[name]
    return {
        "stored as": m.table,
        "gauges": list(m.gauges),
        "node status": m.node_status or "primary and standby",
        "instance level": m.instance_level,
        "statement timeout": m.statement_timeout_seconds,
        "requires extension": list(m.requires_extension),
        "presets": presets_using(catalog, name),
    }


def print_metric(catalog: Catalog, name: str, pg_version: int | None, console: Console | None = None,
                 fmt: str = "table") -> int:
    """Plain: `fact<TAB>key<TAB>value` lines, then `sql<TAB>version<TAB>the SQL on one line (\\n escaped)`."""
    m = catalog.metrics[name]
    chosen: dict[int, str] = {}
    if not m.special:
        if pg_version is None:
            chosen = dict(sorted(m.sql.items()))
        elif m.sql_for(pg_version) is not None:
            key = max(v for v in m.sql if v <= pg_version)
            chosen = {key: m.sql[key]}
    missing = not m.special and pg_version is not None and not chosen
    if fmt in ("json", "plain"):
        facts = _facts(catalog, name)
        if fmt == "json":
            print_json({"name": name, "description": m.description, **{k.replace(" ", "_"): v for k, v in
                        facts.items()}, "special": m.special,
                        "sql": {str(ver): sql.strip() for ver, sql in chosen.items()}})
        else:
            print_plain("metric", name, m.description)
            for fact_name, fact in facts.items():
                print_plain("fact", fact_name, joined(fact) if isinstance(fact, list) else fact)
            for version, sql in chosen.items():
                print_plain("sql", version, sql.strip())
        if missing:  # the reason on stderr: the output stays what a script parses
            print(f"{name}: no SQL for PostgreSQL {pg_version} (versions: {', '.join(map(str, sorted(m.sql)))})",
                  file=sys.stderr)
        return 1 if missing else 0
    console = console or Console()
    console.print(f"[bold]{name}[/bold]: {m.description}")
    facts_text = [
        ("stored as", m.table),
        ("gauges", ", ".join(m.gauges) or "none (all values are counters)"),
        ("node status", m.node_status or "primary and standby"),
        ("instance level", "yes" if m.instance_level else "no"),
        ("statement timeout", f"{m.statement_timeout_seconds:g}s" if m.statement_timeout_seconds else "default"),
        ("requires extension", ", ".join(m.requires_extension) or "none"),
        ("presets", ", ".join(presets_using(catalog, name)) or "none"),
    ]
    for label, text in facts_text:
        console.print(f"  {label}: {text}")
    if m.special:
        console.print("  collected by reaper itself (no SQL)")
        return 0
    if missing:
        console.print(f"  no SQL for PostgreSQL {pg_version} (versions: {', '.join(map(str, sorted(m.sql)))})")
        return 1
    for version, sql in chosen.items():
        label = f"SQL for PostgreSQL {pg_version} (key {version}):" if pg_version is not None else \
            f"SQL for PostgreSQL {version}+:"
        console.print(f"  {label}")
        console.print(Syntax(sql.strip(), "sql", word_wrap=True))
    return 0
