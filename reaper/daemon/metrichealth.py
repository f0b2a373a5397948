"""Which of a source's metrics leave the tick's batch for the slow lane: failing ones and slow ones.

- A metric that fails is *degraded*: it runs alone in the slow lane until it succeeds, then it is back in the
  batch. Said once when it fails, once when it recovers.
- A metric whose part of the tick's one statement took longer than `bound()` is *slow*: the statement, and
  every fast metric in it, waited that long for it at each of its runs (a 3 s custom query due every 5 s
  beside a 1 s metric cost that metric three samples in five). It runs alone in the slow lane from then on
  (said once), and is back in the batch when a run there takes under BACK_FRACTION of the bound.

`alone` is the union, as one frozenset that changes only when a set does (the batch's members are rebuilt
when it changes: reaper.daemon.route.BatchMembers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from reaper.daemon.sourcestate import SourceState

log = logging.getLogger("reaper.daemon.source")

SLOW_SECONDS = 1.0  # a batch member taking longer leaves the batch (half the shortest interval, if less)
LEAST_BOUND = 0.5  # what that bound can be at least: intervals are whole seconds
BACK_FRACTION = 0.25  # ... and comes back when a run alone takes under this share of that bound


def bound(intervals: Mapping[str, int]) -> float:
    """How long one metric may hold the tick's statement: SLOW_SECONDS, or half the source's shortest interval."""
    shortest = min((v for v in intervals.values() if v > 0), default=0)
    return min(SLOW_SECONDS, shortest / 2) if shortest else SLOW_SECONDS


class MetricHealth:
    __slots__ = ("alone", "state")

    def __init__(self, state: SourceState) -> None:
        self.state = state
        self.alone: frozenset[str] = frozenset()  # degraded | slow

    def _changed(self) -> None:
        self.alone = frozenset(self.state.degraded | self.state.slow)

    def batch_took(self, name: str, seconds: float, intervals: Callable[[], Mapping[str, int]]) -> None:
        """A batch member's server time this tick: a slow one leaves the batch. (Called for every member at every
        tick: the source's intervals are looked at only past the least bound.)"""
        if seconds <= LEAST_BOUND:
            return
        limit = bound(intervals())
        if seconds > limit and name not in self.state.slow:
            self.state.slow.add(name)
            self._changed()
            log.warning("source %s: metric %s took %.1fs of the tick's statement (more than %gs): it runs alone in "
                        "the slow lane from now on, so the other metrics keep their intervals", self.state.name, name,
                        seconds, limit)

    def alone_took(self, name: str, seconds: float, intervals: Callable[[], Mapping[str, int]]) -> None:
        """A slow metric's run alone: quick again, it is back in the batch."""
        if name in self.state.slow and seconds < bound(intervals()) * BACK_FRACTION:
            self.state.slow.discard(name)
            self._changed()
            log.info("source %s: metric %s took %.2fs alone: back in the batch", self.state.name, name, seconds)

    def forget(self, keep: Callable[[str], bool]) -> None:
        """After a reload: a metric no longer collected, or whose definition changed, is neither failing nor slow
        any more (status listed a removed metric as degraded for ever; a changed one gets its chance in the batch)."""
        gone = {name for name in self.state.degraded | self.state.slow if not keep(name)}
        if gone:
            self.state.degraded -= gone
            self.state.slow -= gone
            self._changed()

    def recovered(self, name: str, *, back_in_batch: bool) -> None:
        if name in self.state.degraded:
            self.state.degraded.discard(name)
            self._changed()
            log.warning("source %s: metric %s: recovered%s", self.state.name, name,
                        "; back in the batch" if back_in_batch and name not in self.state.slow else "")

    def failed(self, name: str, message: str, *, special: bool = False) -> None:
        st = self.state
        st.metric_errors += 1
        if name not in st.degraded:
            st.degraded.add(name)
            self._changed()
            if special:
                log.error("source %s: metric %s: failed: %s (reported once until it works again; the other "
                          "metrics are unaffected)", st.name, name, message)
            else:
                log.error("source %s: metric %s: failed: %s; isolated (it runs alone in the slow lane until it "
                          "succeeds, the other metrics are unaffected)", st.name, name, message)
        else:
            log.debug("source %s: metric %s: still failing: %s", st.name, name, message)
