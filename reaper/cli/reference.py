"""`reaper metrics list|show`: the metric catalogue for operators."""

from __future__ import annotations

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from reaper.catalog.metrics import Catalog


def presets_using(catalog: Catalog, metric: str) -> list[str]:
    return sorted(name for name, preset in catalog.presets.items() if metric in preset.metrics)


def print_metric_list(catalog: Catalog, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{len(catalog.metrics)} metrics", title_justify="left")
    for col in ("metric", "versions", "presets", "description"):
        table.add_column(col, overflow="fold")
    for name in sorted(catalog.metrics):
        m = catalog.metrics[name]
        versions = "special" if m.special else ", ".join(f"{v}+" for v in sorted(m.sql))
        table.add_row(name, versions, ", ".join(presets_using(catalog, name)), m.description)
    console.print(table)
    presets = Table(title=f"{len(catalog.presets)} presets", title_justify="left")
    for col in ("preset", "metrics", "description"):
        presets.add_column(col, overflow="fold")
    for name in sorted(catalog.presets):
        p = catalog.presets[name]
        presets.add_row(name, " ".join(f"{m}:{s}" for m, s in sorted(p.metrics.items())), p.description)
    console.print(presets)


def print_metric(catalog: Catalog, name: str, pg_version: int | None, console: Console | None = None) -> int:
    console = console or Console()
    m = catalog.metrics[name]
    console.print(f"[bold]{name}[/bold]: {m.description}")
    facts = [
        ("stored as", m.table),
        ("gauges", ", ".join(m.gauges) or "none (all values are counters)"),
        ("node status", m.node_status or "primary and standby"),
        ("instance level", "yes" if m.instance_level else "no"),
        ("statement timeout", f"{m.statement_timeout_seconds:g}s" if m.statement_timeout_seconds else "default"),
        ("requires extension", ", ".join(m.requires_extension) or "none"),
        ("presets", ", ".join(presets_using(catalog, name)) or "none"),
    ]
    for key, value in facts:
        console.print(f"  {key}: {value}")
    if m.special:
        console.print("  collected by reaper itself (no SQL)")
        return 0
    if pg_version is not None:
        sql = m.sql_for(pg_version)
        if sql is None:
            console.print(f"  no SQL for PostgreSQL {pg_version} (versions: {', '.join(map(str, sorted(m.sql)))})")
            return 1
        chosen = max(v for v in m.sql if v <= pg_version)
        console.print(f"  SQL for PostgreSQL {pg_version} (key {chosen}):")
        console.print(Syntax(sql.strip(), "sql", word_wrap=True))
        return 0
    for version in sorted(m.sql):
        console.print(f"  SQL for PostgreSQL {version}+:")
        console.print(Syntax(m.sql[version].strip(), "sql", word_wrap=True))
    return 0
