"""The log: one line per event on stderr, secrets redacted; in systemd's journal, with each line's priority.

On a terminal or in a file a line reads `2026-12-05T12:00:00.123Z WARNING reaper.daemon.source: ...`. When
stderr is the journal's stream (systemd sets $JOURNAL_STREAM to its device and inode, sd_journal_stream_fd(3)),
each line starts instead with the priority journald reads (`<4>` for a warning, the sd-daemon(3) prefixes) and
no time of its own (the journal stamps each line): `journalctl -u reaper -p warning` then shows reaper's
warnings and errors alone, in the journal's colours, where every line was "info" before. A traceback's lines
carry their event's priority, so none of them hides among the info lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from reaper.config.redact import scrub

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# syslog priorities (sd-daemon(3)): err 3, warning 4, info 6, debug 7
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class UTCFormatter(logging.Formatter):
    """One line per event in UTC, with every configured password (and password-shaped text) redacted:
    the last place a secret could slip into a log."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        # the event itself is one line whatever it quotes (a database name, a server's error text): control
        # characters are escaped, so nothing can forge a second log line; a traceback follows on its own lines
        return _CONTROL.sub(lambda m: repr(m.group())[1:-1], super().formatMessage(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JournalFormatter(UTCFormatter):
    """As UTCFormatter, each line (a traceback's too) prefixed with its event's priority for journald."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def priority(level: int) -> int:
    return next((p for at_least, p in PRIORITIES if level >= at_least), 7)


def to_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` is the journal's stream systemd gave the process ($JOURNAL_STREAM is `device:inode`)."""
    wanted = environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # (a stream with no descriptor: pytest's capture)
        return False
    return wanted == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if to_journal(sys.stderr):
        handler.setFormatter(JournalFormatter("%(levelname)-7s %(name)s: %(message)s"))
    else:
        handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncio", "trio_asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
