"""A daemon left running across an upgrade of reaper: a reload that would load the new version's code beside the
old is refused in one line (restart to apply it), and the daemon collects on; a reload that needs nothing new is
applied, and says which version runs. A start whose config needs a module that cannot be loaded is one line.

Before: the reload imported the upgraded file (reaper loads a sink's, kind's or special metric's module only when
the config uses it), failed with a traceback, and the daemon ended.

The daemon runs from a copy of reaper's package (PYTHONPATH) that the test then "upgrades": a new version number,
and a Prometheus sink module that no longer fits the running code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import Daemon, wait_until

import reaper

pytestmark = pytest.mark.pg
ROOT = Path(reaper.__file__).resolve().parent.parent


class CopiedDaemon(Daemon):
    """A `reaper run` of the copy of reaper under `tree`, started from `tree` (so no other reaper is imported)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.tree = tmp / "tree"
        shutil.copytree(ROOT / "reaper", self.tree / "reaper", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "presets", self.tree / "presets")
        self.env = {**os.environ, "PYTHONPATH": str(self.tree)}

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "reaper.cli", "run", "--config", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=log, cwd=self.tree, env=self.env)
        wait_until(lambda: self.status() is not None, what="the daemon's status file")

    def reload(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reaper.cli", "reload", "--config", str(self.config)],
                              capture_output=True, text=True, timeout=60, cwd=self.tree, env=self.env)

    def upgrade(self) -> None:
        init = self.tree / "reaper" / "__init__.py"
        init.write_text(init.read_text().replace(f'__version__ = "{reaper.__version__}"', '__version__ = "9.9.9"'))
        prometheus = self.tree / "reaper" / "sinks" / "prometheus.py"
        moved = "\nfrom reaper.sinks.encode import a_name_the_new_version_moved\n"
        prometheus.write_text(prometheus.read_text() + moved)


@pytest.fixture
def copied(tmp_path: Path) -> Iterator[CopiedDaemon]:
    d = CopiedDaemon(tmp_path)
    yield d
    d.kill()


PROMETHEUS = '\n[[sinks]]\ntype = "prometheus"\nlisten = "127.0.0.1:0"\n'


def test_a_reload_after_an_upgrade_is_refused_in_one_line_when_it_needs_new_code(pg15, fresh_db,
                                                                                 copied: CopiedDaemon) -> None:
    copied.write_config([("one", pg15.dsn(dbname=fresh_db), 1)])
    copied.start()
    wait_until(lambda: len(copied.times("one")) >= 2, what="collection")
    copied.upgrade()

    copied.write_config([("one", pg15.dsn(dbname=fresh_db), 1)], extra=PROMETHEUS)
    result = copied.reload()
    assert result.returncode == 1, result
    seen = len(copied.times("one"))
    wait_until(lambda: len(copied.times("one")) >= seen + 2, what="collection after the refused reload")
    errors = [line for line in copied.log_text().splitlines() if "ERROR" in line]
    assert [line.split("reload: ", 1)[1] for line in errors][-1] == (
        f"reaper's files changed on disk since this daemon started (running {reaper.__version__}, installed 9.9.9), "
        "and this configuration needs parts of reaper the daemon has not loaded (reaper.sinks.prometheus): mixing two "
        "versions is not safe; restart the daemon (systemctl restart reaper) to apply it")
    assert "Traceback" not in copied.log_text()

    # a reload that needs nothing new is applied, and says which version runs
    copied.write_config([("one", pg15.dsn(dbname=fresh_db), 1), ("two", pg15.dsn(dbname=fresh_db), 1)])
    assert copied.reload().returncode == 0
    wait_until(lambda: len(copied.times("two")) >= 1, what="the source the reload added")
    assert f"running {reaper.__version__}, installed 9.9.9): this daemon runs what it loaded at its start" \
        in copied.log_text()

    # the restart runs the installed version: its broken module is one line, no traceback
    assert copied.stop() == 0
    copied.write_config([("one", pg15.dsn(dbname=fresh_db), 1)], extra=PROMETHEUS)
    run = subprocess.run([sys.executable, "-m", "reaper.cli", "run", "--config", str(copied.config)],
                         capture_output=True, text=True, timeout=60, cwd=copied.tree, env=copied.env)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "reaper's module reaper.sinks.prometheus cannot be loaded (ImportError: cannot import name " \
           "'a_name_the_new_version_moved'" in run.stderr
