"""Progress of long one-off work on stderr (reaper.cli.progress): `check --connect` on a fleet said nothing for
minutes (an unreachable source waits for its connect timeout). On a terminal a line redrawn in place and wiped at
the end; elsewhere a plain line every LINE_SECONDS; stdout (the report) untouched."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

from silent_server import SilentServer

from reaper.cli.progress import LINE_SECONDS, QUIET_SECONDS, Progress

REAPER = [sys.executable, "-m", "reaper.cli"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_a_plain_line_now_and_then_and_short_work_nothing() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("checked", "sources", "unreachable", stream=out, clock=clock)
    progress.add(3)
    progress.finish(failed=True)
    clock.now += QUIET_SECONDS / 2
    progress.show()
    assert out.getvalue() == ""  # work this short shows nothing
    clock.now += LINE_SECONDS
    progress.show()
    progress.show()  # not again before LINE_SECONDS more
    assert out.getvalue() == f"checked 1 of 3 sources (1 unreachable), {LINE_SECONDS + QUIET_SECONDS / 2:.0f}s\n"
    progress.clear()
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()


def test_a_terminal_gets_one_line_redrawn_and_wiped_at_the_end() -> None:
    clock, out = Clock(), Terminal()
    progress = Progress("collected", "sources", stream=out, clock=clock)
    progress.add(2)
    clock.now += QUIET_SECONDS
    progress.show()
    progress.show()  # the same text: not drawn again
    progress.finish()
    progress.show()
    progress.clear()
    assert out.getvalue() == ("\r\x1b[Kcollected 0 of 2 sources, 1s" "\r\x1b[Kcollected 1 of 2 sources, 1s"
                              "\r\x1b[K")


def test_check_connect_on_a_terminal_shows_its_progress_and_leaves_stdout_to_the_report(
        silent: SilentServer, tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n'
                      + "".join(f'[[sources]]\nname = "silent{i}"\ndsn = "postgresql://u@127.0.0.1:{silent.port}/db"\n'
                                f'preset = "basic"\nconnect_timeout_seconds = 2\nquery_timeout_seconds = 1\n'
                                for i in range(3)))
    args = [*REAPER, "check", "--config", str(config), "--connect", "--format", "plain"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.execv(sys.executable, args)
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child has exited (EIO)
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 1  # unreachable sources
    text = seen.decode()
    assert "\r\x1b[Kchecked 0 of 3 sources, 1s" in text, text
    drawn = text.rindex("\r\x1b[Kchecked")
    assert "\r\x1b[K" in text[drawn + 3:], text  # wiped before the report
    piped = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 1 and "checked" not in piped.stdout + piped.stderr  # done within LINE_SECONDS
    assert piped.stdout.count("silent") >= 3 and "\x1b" not in piped.stdout
