"""A source's work outside the tick (`Job`), and the timed SQL jobs of one tick that share ONE statement.

A metric with its own `statement_timeout_seconds` is a job of its own in the slow lane
(reaper.daemon.lanes); run alone, each costs a trio-asyncio crossing and a statement (issue 14: ~2.7 % of
a seed tick's CPU each). When the lane takes such a job, it also takes the other jobs of the same tick
under the same timeout that are known to be cheap, and runs them together as one combined statement
(reaper.db: a TickRequest with `timed` metrics only, whose server time is apportioned per metric).

Only metrics that cannot drag a healthy one into a timeout share a statement: one whose last run took
`GROUP_SHARE` of its timeout or more, one that has never run (no history), one that failed or timed out
(degraded: it runs alone until it succeeds) all run alone, and a group's members' last runs add up to
less than GROUP_SHARE of the timeout. Each member keeps its own delivery, cost record and error
handling (`JobOwner`); the lane keeps skipping a metric still pending, per metric.

A cheap metric can still turn slow (a lock, a grown table). When a group's statement hits its timeout,
which member was slow is unknown, so each member runs again alone, right away, under its own deadline: the
healthy ones deliver this run's rows (late by the timeout, not lost), the slow one fails alone and is
isolated. The lane is busy for at most one timeout more than the slow metric alone would have kept it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence, Set
from typing import Any, Protocol

import attrs
import trio

from reaper.config.schema import MetricDef
from reaper.daemon.cost import SourceCost
from reaper.db import SoloQuery, TickOutcome, TickRequest, timeout_ms
from reaper.db.link import SourceLink
from reaper.special import SpecialSpec

log = logging.getLogger("reaper.daemon.source")

GROUP_SHARE = 0.1  # a group's members' last runs add up to less than this share of their timeout


@attrs.frozen
class Job:
    """One metric's run outside the tick: an SQL metric alone (`query`) or a special handler (`spec`)."""

    metric: MetricDef
    wall_ns: int
    interval: float  # seconds between its runs (the lane's idle time follows the longest)
    deadline: float  # seconds the whole job may take (client side)
    query: SoloQuery | None = None
    spec: SpecialSpec | None = None
    given: TickOutcome | None = None  # a special's reads, done in the fast lane's statement (reaper.daemon.rides)

    @property
    def timeout_ms(self) -> str | None:
        """The session statement_timeout the job runs under (None: the connection's default)."""
        return timeout_ms(None if self.query is None else self.query.statement_timeout_seconds)


class JobOwner(Protocol):
    """What a group's run tells its source (reaper.daemon.source.SourceReaper), member by member."""

    @property
    def name(self) -> str: ...

    async def run_job(self, job: Job, link: SourceLink) -> None: ...

    def job_timed_out(self, job: Job) -> None: ...

    def job_done(self, job: Job, rows: list[dict[str, Any]], seconds: float, *, go_ready: bool = False) -> None: ...

    def job_failed(self, job: Job, message: str) -> None: ...


def timeout_share(job: Job, cost: SourceCost, degraded: Set[str]) -> float | None:
    """The share of its own statement timeout the job's metric took in its last run; None when it must run
    alone: not a timed SQL metric, failing or timed out (degraded), or never run here (no history)."""
    query = job.query
    if query is None or not query.statement_timeout_seconds or job.metric.name in degraded:
        return None
    past = cost.metrics.get(job.metric.name)
    last = None if past is None else past.last_run()
    if last is None:
        return None
    return last.seconds / query.statement_timeout_seconds


def take_group(first: Job, queue: list[Job], share: Callable[[Job], float | None]) -> list[Job]:
    """`first` and the queued jobs that may share its statement: same tick, same timeout, cheap enough
    together (taken out of `queue`, in their order). Just `[first]` when it must run alone."""
    total = share(first)
    if total is None or total >= GROUP_SHARE:
        return [first]
    group = [first]
    for job in [j for j in queue if j.wall_ns == first.wall_ns and j.query is not None
                and j.timeout_ms == first.timeout_ms]:
        part = share(job)
        if part is not None and total + part < GROUP_SHARE:
            total += part
            group.append(job)
            queue.remove(job)
    return group


class GroupAbandoned(Exception):
    """A member re-run alone after its group's timeout hung past its own deadline (reported timed out): the
    connection's state is unknown, the lane drops it; `skipped` are the members not run this time."""

    def __init__(self, skipped: Sequence[Job]) -> None:
        super().__init__(", ".join(job.metric.name for job in skipped))
        self.skipped = list(skipped)


async def run_group(owner: JobOwner, jobs: Sequence[Job], link: SourceLink,
                    settled: Callable[[Job], None] = lambda job: None) -> None:
    """Run timed SQL jobs of one tick under one timeout as one combined statement, then hand each member's
    rows (with its own apportioned server time) or error to `owner`. A failing member's SQL makes the link
    re-run each alone, so the others' rows are kept; a statement past its timeout re-runs each member alone
    here (see the module's doc). Raises SourceUnavailable, trio.TooSlowError past the group's deadline (the
    timeout + grace: the server's statement_timeout bounds the whole statement), or GroupAbandoned.
    `settled(job)` as each member's run is over (the lane takes its next run while the others re-run)."""
    request = TickRequest(batch={}, timed={job.metric.name: job.query for job in jobs if job.query is not None})
    with trio.fail_after(max(job.deadline for job in jobs)):
        outcome = await link.run_tick(request)
    again = [job for job in jobs if job.metric.name in outcome.cancelled]
    for job in jobs:
        name = job.metric.name
        rows = outcome.rows.get(name)
        if rows is not None:
            owner.job_done(job, rows, outcome.seconds.get(name, 0.0), go_ready=name in outcome.go_ready)
        elif name not in outcome.cancelled:
            owner.job_failed(job, outcome.errors.get(name, "no result in its group's statement"))
        else:
            continue
        settled(job)
    if again:
        log.info("source %s: metrics %s shared a statement that hit their %s statement_timeout; each runs again "
                 "alone to find the slow one", owner.name, ", ".join(job.metric.name for job in again),
                 f"{again[0].query.statement_timeout_seconds:g}s" if again[0].query is not None else "")
    for i, job in enumerate(again):
        try:
            await owner.run_job(job, link)
        except trio.TooSlowError:
            owner.job_timed_out(job)
            raise GroupAbandoned(again[i + 1:]) from None
        settled(job)
