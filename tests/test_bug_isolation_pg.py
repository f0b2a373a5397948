"""A bug in reaper on one metric's rows fails that metric alone, from outside: a real `reaper run` process with
a bug put in (its top-N folding, a special metric's collector raise), beside a metric that keeps collecting.

Such a bug used to crash the whole source (its other metrics lost with it), restart it, crash it again and,
past the supervisor's limit (6 crashes in 300 s), stop the daemon for every source, and systemd's restart
brought the same crash back: a top_n metric with one numeric NaN did exactly that. Now the bug is said once
with its traceback, counted, and the rows it first failed on are set aside in `<state_dir>/rejected/sources/`.
"""

from __future__ import annotations

import json
import signal
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


def run_with_bugs(script: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`reaper run --config CONFIG` with the bugs `script` puts in first, its log in `log`."""
    with log.open("wb") as err:
        return subprocess.Popen([sys.executable, "-c", script, "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)


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
    proc = run_with_bugs(WITH_BUGS, config, log)
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


# a bug in one source's own loop (not in a metric's rows): it crashes at every tick; restarts come fast here
SOURCE_BUG = """
import sys
import reaper.daemon.source as source
import reaper.daemon.supervise as supervise
supervise.RESTART_BACKOFF_MAX = 0.05
tick = source.SourceReaper.tick

async def buggy(self, due):
    if self.config.name == "bad":
        raise RuntimeError("a bug put in by the test, in one source's tick")
    return await tick(self, due)

source.SourceReaper.tick = buggy
from reaper.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_source_that_crashes_again_and_again_stops_alone_until_a_reload(pg15, fresh_db, tmp_path: Path) -> None:
    """Past the supervisor's limit (6 crashes in 300 s) a source crashing on a bug stopped the whole daemon, and
    systemd's restart brought the same crash back: every source lost its data again and again. Now that source
    stays stopped ("crashed" in the status, its traceback logged once), the others collect, a reload tries it
    again."""
    out, state, log = tmp_path / "out.ndjson", tmp_path / "state", tmp_path / "reaper.log"
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{state}"\n'
                      '[metrics.ping]\ngauges = ["*"]\nsql = { 11 = "select 1 as v" }\n'
                      + "".join(f'[[sources]]\nname = "{name}"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n'
                                'metrics = { ping = 1 }\n' for name in ("bad", "good"))
                      + f'[[sinks]]\ntype = "jsonfile"\npath = "{out}"\n')
    proc = run_with_bugs(SOURCE_BUG, config, log)
    try:
        def pings() -> int:
            return out.read_text().count('"dbname":"good"') if out.exists() else 0

        def stopped_after_crashes() -> int:
            return log.read_text().count("source bad: crashed 6 times")

        def status_of(name: str) -> dict:
            sources = json.loads((state / "status.json").read_text())["sources"]
            return next(s for s in sources if s["name"] == name)

        wait_until(lambda: stopped_after_crashes() == 1 or proc.poll() is not None, limit=60,
                   what="the bad source stopped")
        assert proc.poll() is None, log.read_text()  # the daemon runs on
        before = pings()
        wait_until(lambda: pings() >= before + 3, what="three more rows of the good source")
        proc.send_signal(signal.SIGUSR2)  # a fresh status file
        wait_until(lambda: status_of("bad")["status"] == "crashed", what="bad's status: crashed")
        assert "a bug put in by the test" in status_of("bad")["last_error"]
        assert status_of("good")["status"] == "up"

        proc.send_signal(signal.SIGHUP)  # a reload, the config unchanged: the crashed source tries again
        wait_until(lambda: stopped_after_crashes() == 2 or proc.poll() is not None, limit=60,
                   what="the bad source tried again, and stopped again")
        assert proc.poll() is None and "source bad: trying again after the reload" in log.read_text()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    starts = [line for line in text.splitlines()
              if line.startswith("Traceback (most recent") or line.lstrip(" +").startswith("Exception Group Traceback")]
    assert len(starts) == 1, text  # said once, then one line a crash
    assert "source good: unexpected error" not in text
