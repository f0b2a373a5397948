"""Signals that come while `reaper run` starts, from outside: a real process, signalled before it watches them.

The daemon watches its signals once trio runs, a few hundred milliseconds after the process starts (seconds on
a loaded machine). A SIGHUP before that (a `systemctl reload` right after a start, with Type=simple) ended the
daemon with the signal's default action, an exit systemd counts as clean: Restart=on-failure did not start it
again. reaper.launch catches them first thing; the daemon handles them once it runs (a reload, a drain).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from test_daemon import REAPER, Daemon, wait_until


def caught(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` now (/proc's SigCgt mask)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(line.split()[1] for line in text.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (signum - 1)))


def test_a_sighup_before_the_daemon_watches_its_signals_is_a_reload_not_an_end(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.write_config([("gone", "postgresql://reaper@127.0.0.1:1/x", 60)])
    with daemon.log.open("wb") as log:
        daemon.proc = subprocess.Popen([*REAPER, "run", "--config", str(daemon.config)], stdout=subprocess.DEVNULL,
                                       stderr=log)
    try:
        pid = daemon.proc.pid
        # caught long before the daemon runs: its status file is not there yet
        wait_until(lambda: caught(pid, signal.SIGHUP) or daemon.state.joinpath("status.json").exists()
                   or daemon.proc.poll() is not None, what="SIGHUP caught or the daemon started")
        assert caught(pid, signal.SIGHUP) and not daemon.state.joinpath("status.json").exists(), \
            "SIGHUP is not caught before the daemon has started"
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "reload: applied" in daemon.log_text() or daemon.proc.poll() is not None,
                   what="the reload applied once the daemon runs")
        assert daemon.proc.poll() is None, daemon.log_text()
        assert "SIGHUP came while the daemon started: handled now" in daemon.log_text()
    finally:
        assert daemon.stop() == 0
