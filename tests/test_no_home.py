"""A user with no home directory (a container's arbitrary uid with no passwd entry, a bare cron environment) and no
`[collector] state_dir`: every command says so in one line and what to set, instead of a traceback
("RuntimeError: Could not determine home directory", before).

Run as root, the test drops to a uid that has no passwd entry (setpriv, util-linux), without HOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY_UID = 48213  # no passwd entry on a test machine
LINE = (f"collector.state_dir is not set and there is no home directory to keep reaper's state under (HOME is unset "
        f"and uid {NOBODY_UID} has no passwd entry): set [collector] state_dir, or XDG_STATE_HOME or STATE_DIRECTORY "
        f"in the environment")


def as_nobody(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    bare = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_STATE_HOME", "STATE_DIRECTORY")}
    return subprocess.run(["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups",
                           sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**bare, **(env or {})})


@pytest.fixture
def folder() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as a uid with no passwd entry")
    path = Path(tempfile.mkdtemp(prefix="reaper-nohome-"))
    path.chmod(0o777)
    try:
        probe = as_nobody("-c", "import reaper", cwd=path)
        if probe.returncode != 0:
            pytest.skip(f"this interpreter or checkout is not readable by another uid: {probe.stderr[-200:]}")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_no_home_and_no_state_dir_is_one_line_for_every_command(folder: Path) -> None:
    config = folder / "reaper.toml"
    config.write_text(f'[[sinks]]\ntype = "jsonfile"\npath = "{folder}/out.ndjson"\n\n'
                      '[[sources]]\nname = "a"\ndsn = "postgresql://127.0.0.1:1/x"\npreset = "minimal"\n')
    config.chmod(0o644)
    for verb in ("check", "run", "status"):
        done = as_nobody("-m", "reaper.cli", verb, "--config", str(config), cwd=folder)
        assert done.returncode == 1, (verb, done.stderr)
        assert done.stderr.splitlines() == [f"{config}: {LINE}"], (verb, done.stderr)
    # what the line says to set works
    done = as_nobody("-m", "reaper.cli", "check", "--config", str(config), cwd=folder,
                     env={"XDG_STATE_HOME": str(folder)})
    assert done.returncode == 0, done.stderr
