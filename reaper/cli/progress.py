"""Progress of a one-off command's long work on stderr (`reaper check --connect`, `reaper once`).

A fleet's check can take minutes (hundreds of sources, 8 at a time; an unreachable one waits for its connect
timeout) and said nothing until the end. While the work runs, stderr shows how far it is: on a terminal one
line redrawn in place every PAINT_SECONDS (and wiped at the end, so the report is left as it was), elsewhere
(a pipe, a CI log) a plain line every LINE_SECONDS. Work done within QUIET_SECONDS shows nothing. stdout is
never touched: it stays the report, for grep and jq.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TextIO

import trio

QUIET_SECONDS = 1.0  # nothing is shown for work that ends sooner
PAINT_SECONDS = 0.25  # a terminal's line is redrawn this often
LINE_SECONDS = 10.0  # elsewhere, a line this often


class Progress:
    """`checked 120 of 1000 sources (3 unreachable), 42s`: `total` may grow (a discovery source's databases)."""

    def __init__(self, verb: str, noun: str, failure: str = "failed", *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.verb, self.noun, self.failure = verb, noun, failure
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.total = self.done = self.failed = 0
        self.started = clock()
        self._shown = False  # a terminal's line is on the screen
        self._drawn = ""  # ... and what it says
        self._last = self.started  # when a plain line was last written
        try:
            self.terminal = self.stream.isatty()
        except (AttributeError, ValueError):
            self.terminal = False

    def add(self, n: int = 1) -> None:
        self.total += n

    def finish(self, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed

    def text(self) -> str:
        failed = f" ({self.failed} {self.failure})" if self.failed else ""
        return f"{self.verb} {self.done} of {self.total} {self.noun}{failed}, {self.clock() - self.started:.0f}s"

    def show(self) -> None:
        """Write the line if it is due (the caller calls this now and then)."""
        now = self.clock()
        if now - self.started < QUIET_SECONDS:
            return
        if self.terminal:
            text = self.text()
            if text == self._drawn:
                return
            self.stream.write("\r\x1b[K" + text)
            self._shown, self._drawn = True, text
        elif now - self._last >= LINE_SECONDS:
            self.stream.write(self.text() + "\n")
            self._last = now
        else:
            return
        self.stream.flush()

    def clear(self) -> None:
        """At the end: a terminal's line wiped (the report follows on a clean screen)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    @asynccontextmanager
    async def shown(self) -> AsyncIterator[None]:
        """The line shown while the body runs (the work's tasks in a nursery of the body's own), wiped after."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run)
            yield
            nursery.cancel_scope.cancel()

    async def run(self) -> None:
        """Show the line until cancelled (started in the work's nursery, cancelled when the work is done)."""
        try:
            while True:
                await trio.sleep(PAINT_SECONDS if self.terminal else 1.0)
                self.show()
        finally:
            self.clear()
