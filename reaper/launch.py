"""The `reaper` command's entry point: signals that come while the daemon starts are kept, not fatal.

`reaper run` watches its signals once trio runs: a few hundred milliseconds after the process starts (the
imports of trio, asyncio and asyncpg; seconds on a loaded machine or a cold disk). Before that, a signal had
its default action: a SIGHUP (a `systemctl reload`, or a config tool's reload right after a start, with
`Type=simple`) or a SIGUSR1 (`reaper fleet leave`) ended the daemon, and systemd counts an end by SIGHUP as a
clean exit: `Restart=on-failure` did not start it again. This module, imported before anything heavy, notes
them instead; the daemon handles each once it watches its signals (a reload, a drain). SIGUSR2 (`reaper
status` asking for a fresh status file) is ignored until then: the daemon writes one as it starts.

A signal in the interpreter's own start-up (before any of reaper's code runs, ~20 ms) cannot be caught.
"""

from __future__ import annotations

import sys

from reaper.earlysignals import keep_early_signals


def main() -> int:
    if "run" in sys.argv[1:]:  # (only the daemon: every other verb keeps the default actions)
        keep_early_signals()
    from reaper.cli import main as cli_main

    return cli_main()
