"""reaper's log in systemd's journal, from outside: a real `reaper run` whose stderr is the journal's stream.

systemd gives a service's stderr to journald and says so in $JOURNAL_STREAM (`device:inode` of that stream).
Every reaper line went in at the journal's default priority, info, with a second timestamp of its own:
`journalctl -u reaper -p warning` showed nothing, a source going down looked like any other line. Now each
line starts with the priority journald reads (`<3>` error, `<4>` warning, `<6>` info), a traceback's lines too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import pytest
from test_daemon import Daemon, wait_until

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def lines_once(daemon: Daemon, monkeypatch: pytest.MonkeyPatch, journal: bool) -> list[str]:
    daemon.log.touch()  # the daemon's stderr: the same file (inode) once opened
    st = os.stat(daemon.log)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + (0 if journal else 1)}")
    # a source whose server is not there: an ERROR line, among the INFO ones
    daemon.write_config([("gone", "postgresql://reaper@127.0.0.1:1/x", 1)])
    daemon.start()
    try:
        wait_until(lambda: "down:" in daemon.log_text(), what="the source said down")
    finally:
        assert daemon.stop() == 0
    return daemon.log_text().splitlines()


def test_in_the_journal_each_line_carries_its_priority_and_no_time_of_its_own(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    lines = lines_once(Daemon(tmp_path), monkeypatch, journal=True)
    assert lines and all(re.match(r"<[2-7]>[A-Z]+ ", line) for line in lines), lines
    assert not [line for line in lines if STAMP.search(line[:40])], lines
    down = next(line for line in lines if "down:" in line)
    assert down.startswith("<3>ERROR ") and "source gone" in down, down
    assert next(line for line in lines if "starting with" in line).startswith("<6>INFO ")


def test_elsewhere_the_lines_keep_their_time_and_no_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = lines_once(Daemon(tmp_path), monkeypatch, journal=False)  # $JOURNAL_STREAM names another stream
    assert lines and all(STAMP.match(line) for line in lines), lines


def test_a_tracebacks_lines_carry_the_events_priority() -> None:
    from reaper.cli.logs import JournalFormatter

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("reaper.x", logging.ERROR, __file__, 1, "failed: %s", ("it",), exc_info=None)
        record.exc_info = sys.exc_info()
    text = JournalFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    lines = text.splitlines()
    assert lines[0] == "<3>ERROR reaper.x: failed: it" and len(lines) > 2
    assert all(line.startswith("<3>") for line in lines), lines
