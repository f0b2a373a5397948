"""A bug in reaper on one metric's rows fails that metric alone, from outside: a real `reaper run` process with
a bug put in (its top-N folding, a special metric's collector raise), beside a metric that keeps collecting.

Such a bug used to crash the whole source (its other metrics lost with it), restart it, crash it again and,
past the supervisor's limit (6 crashes in 300 s), stop the daemon for every source, and systemd's restart
brought the same crash back: a top_n metric with one numeric NaN did exactly that. Now the bug is said once
with its traceback, counted, and the rows it first failed on are set aside in `<state_dir>/rejected/sources/`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_daemon import wait_until

pytestmark = pytest.mark.pg

# the same `reaper` command, with two bugs put in first
WITH_BUGS = """
import sys
import reaper.daemon.topn as topn
import reaper.special.osmetrics as osmetrics

def fold(self, rows):
    raise ValueError("a bug put in by the test")

async def psutil_mem(ctx):
    raise KeyError("a bug put in by the test, in a special metric")

topn.TopNState.fold = fold
osmetrics.psutil_mem = psutil_mem
from reaper.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_on_one_metrics_rows_fails_that_metric_alone_and_sets_its_rows_aside(pg15, fresh_db,
                                                                                   tmp_path: Path) -> None:
    out, state, log = tmp_path / "out.ndjson", tmp_path / "state", tmp_path / "reaper.log"
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{state}"\n'
                      '[metrics.ranked]\ngauges = ["*"]\ntop_n = { n = 1, by = "v", key = ["tag_k"] }\n'
                      'sql = { 11 = "select x::text as tag_k, x as v from generate_series(1, 3) as x" }\n'
                      '[metrics.ping]\ngauges = ["*"]\nsql = { 11 = "select 1 as v" }\n'
                      f'[[sources]]\nname = "a"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n'
                      'metrics = { ranked = 1, ping = 1, psutil_mem = 1 }\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{out}"\n')
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", WITH_BUGS, "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        def pings() -> int:
            return out.read_text().count('"metric":"ping"') if out.exists() else 0

        wait_until(lambda: pings() >= 3, limit=60, what="three pings")
        assert proc.poll() is None  # still running
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "restarting" not in text and ": down:" not in text, text
    bugs = [line for line in text.splitlines() if "a bug in reaper" in line]
    assert len(bugs) == 2 and text.count("Traceback (most recent call last)") == 2, text  # once per metric
    assert any("metric ranked: a bug in reaper (ValueError" in b and "rows set aside in" in b for b in bugs), bugs
    assert any("metric psutil_mem: a bug in reaper (KeyError" in b for b in bugs), bugs
    assert '"metric":"ranked"' not in out.read_text() and '"metric":"psutil_mem"' not in out.read_text()
    [aside] = (state / "rejected" / "sources").glob("*.ndjson")
    kept = [json.loads(line) for line in aside.read_text().splitlines()]
    assert [k["metric"] for k in kept] == ["ranked"], kept  # its first run's rows (a bug's next runs: counted)
    assert kept[0]["rows"] == [{"tag_k": str(x), "v": x} for x in (1, 2, 3)]  # as the bug met them
    assert kept[0]["error"] == "ValueError: a bug put in by the test"
    [source] = json.loads((state / "status.json").read_text())["sources"]
    assert source["metric_errors"] >= 3 and source["status"] == "up", source  # every run counted
