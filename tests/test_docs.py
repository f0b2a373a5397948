"""docs/metrics.md: generated from the catalogue and docs/matrix.json, and never stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reaper.catalog.docs import MATRIX_VERSIONS, load_matrix, render, render_shipped, result_kind, short_result
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, NameList, PresetDef
from reaper.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
METRICS_MD = ROOT / "docs" / "metrics.md"
MATRIX_JSON = ROOT / "docs" / "matrix.json"
REGENERATE = "reaper metrics docs --output docs/metrics.md"


def reaper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reaper.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "REAPER_LOG_LEVEL": "warning"})


def small_catalog() -> Catalog:
    epoch = "select (extract(epoch from now()) * 1e9)::int8 as epoch_ns"
    metrics = {
        "beta": MetricDef(name="beta", description="Second | with a pipe.", columns=("epoch_ns", "tag_db", "n", "g"),
                          gauges=("g",), sql={14: f"{epoch}, 'x' as tag_db, 1 as n, 2 as g", 17: f"{epoch}"},
                          instance_level=True, node_status="primary", storage_name="alpha",
                          requires_extension=NameList(("pgstattuple",)), statement_timeout_seconds=300),
        "alpha": MetricDef(name="alpha", description="First.", columns=("epoch_ns", "v"), gauges=("*",),
                           sql={14: f"{epoch}, 1 as v"}),
        "up": MetricDef(name="up", description="Up.", columns=("epoch_ns", "up"), gauges=("*",), special=True),
    }
    presets = {"two": PresetDef(description="Both.", metrics={"beta": 60, "alpha": 30}),
               "one": PresetDef(description="One.", metrics={"alpha": 300})}
    return Catalog(metrics=metrics, presets=presets)


def test_committed_reference_is_current() -> None:
    assert METRICS_MD.exists(), f"{METRICS_MD} is missing: run `{REGENERATE}`"
    fresh = render_shipped(MATRIX_JSON)
    committed = METRICS_MD.read_text(encoding="utf-8")
    if committed != fresh:
        pytest.fail(f"{METRICS_MD} is stale: run `{REGENERATE}`", pytrace=False)


def test_reference_covers_every_metric_and_preset() -> None:
    catalog = Catalog.for_config()
    text = render_shipped(MATRIX_JSON)
    for name in catalog.metrics:
        assert f"\n### {name}\n" in text
        assert f"| [{name}](#{name}) |" in text
    for name in catalog.presets:
        assert f"\n| {name} | " in text


def test_render_is_deterministic_and_sorted() -> None:
    catalog = small_catalog()
    matrix = {"alpha": {"14": "ok", "15": "ok"}, "beta": {"14": "needs extension pgstattuple"}}
    text = render(catalog, matrix)
    assert text == render(Catalog(metrics=dict(reversed(list(catalog.metrics.items()))),
                                  presets=dict(reversed(list(catalog.presets.items())))), matrix)
    assert text.index("### alpha") < text.index("### beta") < text.index("### up")
    assert text.index("| one |") < text.index("| two |")
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_metric_section_shows_columns_keys_presets_flags_and_results() -> None:
    matrix = {"beta": {"14": "ok", "15": "no SQL for 15", "16": "needs extension pgstattuple",
                       "17": "failed: alone: boom"}}
    text = render(small_catalog(), matrix)
    section = text[text.index("### beta"):text.index("### up")]
    assert "Second \\| with a pipe." in section
    for row in ("| epoch_ns | time |", "| tag_db | tag |", "| n | counter |", "| g | gauge |"):
        assert row in section
    assert "- **SQL version keys**: 14+, 17+" in section
    assert "- **presets**: two (60 s)" in section
    for flag in ("instance level", "primary only", "stored as `alpha`", "needs extension `pgstattuple`",
                 "statement timeout 300 s"):
        assert flag in section
    assert ("- **matrix**: 14: ok; 15: no SQL for 15; 16: needs extension pgstattuple; 17: failed: alone: boom; "
            "18: not run") in section
    assert "| [beta](#beta) | ok | no SQL | needs pgstattuple | **failed** | not run |" in text
    up = text[text.index("### up"):]
    assert "- **SQL version keys**: none" in up and "special (collected by reaper itself)" in up
    assert "| up | gauge |" in up


def test_summary_counts_results_per_version() -> None:
    catalog = small_catalog()
    matrix = {name: {str(v): "ok" for v in MATRIX_VERSIONS} for name in catalog.metrics}
    matrix["up"] = {str(v): "special" for v in MATRIX_VERSIONS}
    text = render(catalog, matrix)
    assert "- **3 metrics**: 2 PostgreSQL SQL metrics, 1 special" in text
    assert "| ok | 2 | 2 | 2 | 2 | 2 |" in text
    assert "| special | 1 | 1 | 1 | 1 | 1 |" in text
    assert "| failed | 0 | 0 | 0 | 0 | 0 |" in text


def test_result_kinds() -> None:
    assert result_kind("ok") == "ok"
    assert result_kind("no SQL for 14") == "no SQL"
    assert result_kind("needs extension pg_qualstats") == "needs extension"
    assert result_kind("failed: batch: x") == "failed"
    assert result_kind("something else") == "failed"
    assert short_result("needs extension pg_qualstats, pg_stat_statements") == "needs pg_qualstats, pg_stat_statements"


def test_matrix_file_problems_are_one_line(tmp_path: Path) -> None:
    assert load_matrix(tmp_path / "missing.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text('{"m": {"14": 1}}')
    with pytest.raises(ConfigError) as e:
        load_matrix(bad)
    assert e.value.problems == [f"{bad}: expected {{metric: {{version: result}}}}"]
    proc = reaper("metrics", "docs", "--matrix", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"{bad}: expected {{metric: {{version: result}}}}"]


def test_cli_writes_the_reference(tmp_path: Path) -> None:
    matrix = tmp_path / "matrix.json"
    matrix.write_text(json.dumps({"db_stats": {"14": "ok"}}))
    out = tmp_path / "metrics.md"
    proc = reaper("metrics", "docs", "--output", str(out), "--matrix", str(matrix))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8") == render_shipped(matrix)
    stdout = reaper("metrics", "docs", "--matrix", str(matrix))
    assert stdout.returncode == 0, stdout.stderr
    assert stdout.stdout == render_shipped(matrix)
