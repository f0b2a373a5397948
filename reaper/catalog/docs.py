"""`reaper metrics docs`: the metric reference (docs/metrics.md) rendered from the catalogue.

Pure: the catalogue and the version matrix in, Markdown out, sorted so that the same input always
gives the same bytes (tests/test_docs.py compares the committed file with a fresh render).
The matrix (docs/matrix.json, `{metric: {version: result}}`) is written by tests/test_matrix.py
under `just test-matrix`: each metric's SQL run on real PostgreSQL servers.
The deliberate differences from pgwatch's value kinds are the rows of tests/data/pgwatch_kinds.tsv
whose note starts with `deliberate:` (that table is checked by tests/test_value_kinds.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from reaper.catalog.metrics import Catalog, presets_dir
from reaper.config.schema import MetricDef
from reaper.errors import ConfigError
from reaper.special.registry import REGISTRY

MATRIX_VERSIONS = (14, 15, 16, 17, 18)
Matrix = Mapping[str, Mapping[str, str]]

GENERATED_BY = "reaper metrics docs --output docs/metrics.md"
RESULT_KINDS = ("ok", "no SQL", "needs extension", "special", "n/a", "failed", "not run")


class KindDifference(NamedTuple):
    """A column whose JSON kind differs from pgwatch's on purpose."""

    metric: str
    column: str
    pgwatch_kind: str
    reason: str


DELIBERATE = "deliberate:"


def default_kinds_path() -> Path:
    """tests/data/pgwatch_kinds.tsv next to the shipped presets/ (in a source checkout)."""
    return presets_dir().parent / "tests" / "data" / "pgwatch_kinds.tsv"


def load_kind_differences(path: Path) -> list[KindDifference]:
    """The table's deliberate rows (metric, column, kind, note); a missing file has none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the value kinds table: {e}"]) from None
    rows = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and not line.startswith("#") and fields[3].startswith(DELIBERATE):
            rows.append(KindDifference(fields[0], fields[1], fields[2], fields[3].removeprefix(DELIBERATE).strip()))
    return sorted(rows)


def default_matrix_path() -> Path:
    """docs/matrix.json next to the shipped presets/ (in a source checkout)."""
    return presets_dir().parent / "docs" / "matrix.json"


def load_matrix(path: Path) -> dict[str, dict[str, str]]:
    """The matrix file; a missing file is an empty matrix (every result then reads "not run")."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError([f"{path}: cannot read the version matrix: {e}"]) from None
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and all(isinstance(r, str) for r in v.values()) for v in data.values()):
        raise ConfigError([f"{path}: expected {{metric: {{version: result}}}}"])
    return {str(k): {str(ver): r for ver, r in v.items()} for k, v in data.items()}


def result_kind(result: str) -> str:
    """The family of one matrix result ("no SQL for 14" -> "no SQL")."""
    for kind in RESULT_KINDS:
        if result == kind or result.startswith(kind + " ") or result.startswith(kind + ":"):
            return kind
    return "failed"


def short_result(result: str) -> str:
    """A matrix cell: short, the full text is in the metric's own section."""
    kind = result_kind(result)
    if kind == "needs extension":
        return "needs " + result.removeprefix("needs extension ").strip()
    if kind == "failed":
        return "**failed**"
    return kind


def column_kind(metric: MetricDef, column: str) -> str:
    if column == "epoch_ns":
        return "time"
    if column.startswith("tag_"):
        return "tag"
    return "gauge" if metric.is_gauge(column) else "counter"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _results(matrix: Matrix, name: str) -> list[str]:
    row = matrix.get(name, {})
    return [row.get(str(v), "not run") for v in MATRIX_VERSIONS]


def _presets_using(catalog: Catalog, name: str) -> list[tuple[str, int]]:
    return sorted((p, preset.metrics[name]) for p, preset in catalog.presets.items() if name in preset.metrics)


def _flags(metric: MetricDef) -> list[str]:
    flags = []
    if metric.special:
        flags.append("special (collected by reaper itself)")
    if metric.instance_level:
        flags.append("instance level")
    if metric.node_status:
        flags.append(f"{metric.node_status} only")
    if metric.storage_name:
        flags.append(f"stored as `{metric.storage_name}`")
    if metric.top_n is not None and metric.top_n.by and metric.top_n.key:
        on = f"on, n = {metric.top_n.n}" if metric.top_n.n else "off unless a preset or source sets n"
        flags.append(f"top_n by `{metric.top_n.by}`, key {', '.join(f'`{k}`' for k in metric.top_n.key)} ({on})")
    if metric.requires_extension:
        flags.append("needs extension " + ", ".join(f"`{e}`" for e in metric.requires_extension))
    if metric.statement_timeout_seconds is not None:
        flags.append(f"statement timeout {metric.statement_timeout_seconds:g} s (runs outside the batch)")
    if tuple(metric.source_kinds) != ("postgres",):
        flags.append("source kinds " + ", ".join(metric.source_kinds))
    if metric.init_sql:
        flags.append("has init SQL (helpers a DBA creates once)")
    if metric.budget_exempt:
        flags.append("budget exempt (never stretched by `server_budget_ms_per_minute`)")
    if metric.heavy:
        flags.append("heavy (skipped while `pause_when_active_backends_over` is exceeded)")
    return flags


def _summary(catalog: Catalog, matrix: Matrix) -> list[str]:
    metrics = catalog.metrics
    special = sum(1 for m in metrics.values() if m.special)
    other_kinds = sum(1 for m in metrics.values() if "postgres" not in m.source_kinds)
    sql = len(metrics) - special - other_kinds
    extensions = sum(1 for m in metrics.values() if m.requires_extension)
    lines = [
        "## Summary",
        "",
        f"- **{len(metrics)} metrics**: {sql} PostgreSQL SQL metrics, {special} special (collected by reaper "
        f"itself), {other_kinds} for other source kinds (pgbouncer, pgpool); {extensions} need an extension.",
        f"- **{len(catalog.presets)} presets**.",
        f"- **Cost**: {sum(1 for m in metrics.values() if m.budget_exempt)} metrics are budget exempt (a source's "
        f"`server_budget_ms_per_minute` never stretches them), {sum(1 for m in metrics.values() if m.heavy)} are "
        "heavy (skipped while `pause_when_active_backends_over` is exceeded); what each metric costs a server is in "
        "`reaper status` and the `reaper_cost` self-measurement (README: Budget and cost).",
        "- **Version matrix** (metrics per result and PostgreSQL version):",
        "",
        "| result | " + " | ".join(str(v) for v in MATRIX_VERSIONS) + " |",
        "|---|" + "---:|" * len(MATRIX_VERSIONS),
    ]
    counts = {kind: [0] * len(MATRIX_VERSIONS) for kind in RESULT_KINDS}
    for name in metrics:
        for i, result in enumerate(_results(matrix, name)):
            counts[result_kind(result)][i] += 1
    for kind in RESULT_KINDS:
        if any(counts[kind]) or kind in ("ok", "failed"):
            lines.append(f"| {kind} | " + " | ".join(str(c) for c in counts[kind]) + " |")
    return lines


def _matrix_table(catalog: Catalog, matrix: Matrix) -> list[str]:
    lines = [
        "## Version matrix",
        "",
        "`ok`: the SQL chosen for that version ran as a `pg_monitor`-only role, alone and inside the combined "
        "statement, and returned the declared columns (and rows, where the test server can have some). "
        "`no SQL`: the metric has no SQL for that version (its description says why). "
        "`needs X`: the extension is not available on the test servers. "
        "`special`: collected by reaper's own code. `n/a`: not a PostgreSQL metric.",
        "",
        "| metric | " + " | ".join(str(v) for v in MATRIX_VERSIONS) + " |",
        "|---|" + "---|" * len(MATRIX_VERSIONS),
    ]
    for name in sorted(catalog.metrics):
        cells = [short_result(r) for r in _results(matrix, name)]
        lines.append(f"| [{name}](#{name}) | " + " | ".join(cells) + " |")
    return lines


def _presets_table(catalog: Catalog) -> list[str]:
    lines = ["## Presets", "", "| preset | metrics (interval in seconds) | description |", "|---|---|---|"]
    for name in sorted(catalog.presets):
        preset = catalog.presets[name]
        entries = ", ".join(f"{m}:{s}" for m, s in sorted(preset.metrics.items()))
        if preset.top_n:
            entries += "; top_n: " + ", ".join(f"{m} n = {t.n}" for m, t in sorted(preset.top_n.items()))
        lines.append(f"| {name} | {_cell(entries)} | {_cell(preset.description)} |")
    return lines


def _kind_differences(differences: Sequence[KindDifference]) -> list[str]:
    lines = [
        "## Deliberate differences from pgwatch's value kinds",
        "",
        "Every stored column carries the JSON kind (integer, number, string, boolean) that pgwatch's own SQL "
        "gives the same metric's column, so its dashboards' casts (`::int8`, `::float8`, `::bool`) work on "
        "reaper's storage: the table `tests/data/pgwatch_kinds.tsv`, checked against reaper's SQL on "
        "PostgreSQL 14, 15 and 18 by `tests/test_value_kinds.py`. These columns differ on purpose:",
        "",
    ]
    if not differences:
        return [*lines, "None."]
    lines += ["| metric | column | pgwatch's kind | why reaper differs |", "|---|---|---|---|"]
    lines += [f"| [{d.metric}](#{d.metric}) | {d.column} | {d.pgwatch_kind} | {_cell(d.reason)} |"
              for d in differences]
    return lines


def _metric_section(catalog: Catalog, matrix: Matrix, name: str) -> list[str]:
    metric = catalog.metrics[name]
    lines = [f"### {name}", "", _cell(metric.description) or "(no description)", ""]
    if metric.columns:
        lines += ["| column | kind |", "|---|---|"]
        lines += [f"| {c} | {column_kind(metric, c)} |" for c in metric.columns]
    else:
        lines.append("No columns declared.")
    lines.append("")
    keys = ", ".join(f"{v}+" for v in sorted(metric.sql)) if metric.sql else "none"
    using = ", ".join(f"{p} ({s} s)" for p, s in _presets_using(catalog, name)) or "none"
    flags = "; ".join(_flags(metric)) or "none"
    results = "; ".join(f"{v}: {_cell(r)}" for v, r in zip(MATRIX_VERSIONS, _results(matrix, name), strict=True))
    lines += [
        f"- **SQL version keys**: {keys}",
        f"- **presets**: {using}",
        f"- **flags**: {flags}",
        f"- **matrix**: {results}",
    ]
    entry = REGISTRY.get(name)
    if entry is not None and entry.how:
        lines.append(f"- **how it is collected**: {_cell(entry.how)}")
    return [*lines, ""]


def render(catalog: Catalog, matrix: Matrix, differences: Sequence[KindDifference] = ()) -> str:
    """The whole reference as Markdown (deterministic: everything sorted by name)."""
    lines = [
        "# Metric reference",
        "",
        f"Generated by `{GENERATED_BY}` from `presets/*.toml` and `docs/matrix.json`; do not edit it by "
        "hand. The matrix comes from `tests/test_matrix.py` (`just test-matrix`), which runs every metric on "
        "real PostgreSQL " + ", ".join(str(v) for v in MATRIX_VERSIONS) + " servers.",
        "",
        "Column kinds: `time` is the sample's timestamp (`epoch_ns`), `tag` columns are labels, `gauge` "
        "values are levels, `counter` values only grow (until a statistics reset or a restart).",
        "",
    ]
    for part in (_summary(catalog, matrix), _matrix_table(catalog, matrix), _presets_table(catalog),
                 _kind_differences(differences)):
        lines += [*part, ""]
    lines += ["## Metrics", ""]
    for name in sorted(catalog.metrics):
        lines += _metric_section(catalog, matrix, name)
    return "\n".join(lines).rstrip("\n") + "\n"


def render_shipped(matrix_path: Path | None = None) -> str:
    """The reference of the shipped catalogue, with the matrix file (default: docs/matrix.json) and the
    deliberate rows of the value kinds table."""
    path = matrix_path if matrix_path is not None else default_matrix_path()
    return render(Catalog.for_config(), load_matrix(path), load_kind_differences(default_kinds_path()))
