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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from typing import Any, Protocol

import attrs
import trio

from reaper.config.schema import MetricDef
from reaper.daemon.cost import SourceCost
from reaper.db import SoloQuery, TickRequest, timeout_ms
from reaper.db.link import SourceLink
from reaper.special import SpecialSpec

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

    @property
    def timeout_ms(self) -> str | None:
        """The session statement_timeout the job runs under (None: the connection's default)."""
        return timeout_ms(None if self.query is None else self.query.statement_timeout_seconds)


class JobOwner(Protocol):
    """What a group's run tells its source (reaper.daemon.source.SourceReaper), member by member."""

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


async def run_group(owner: JobOwner, jobs: Sequence[Job], link: SourceLink) -> None:
    """Run timed SQL jobs of one tick under one timeout as one combined statement, then hand each member's
    rows (with its own apportioned server time) or error to `owner`. A failing member's SQL makes the link
    re-run each alone, so the others' rows are kept; a statement past its timeout fails every member (each
    runs alone next time). Raises SourceUnavailable, or trio.TooSlowError past the group's deadline (the
    timeout + grace: the server's statement_timeout bounds the whole statement)."""
    request = TickRequest(batch={}, timed={job.metric.name: job.query for job in jobs if job.query is not None})
    with trio.fail_after(max(job.deadline for job in jobs)):
        outcome = await link.run_tick(request)
    for job in jobs:
        name = job.metric.name
        rows = outcome.rows.get(name)
        if rows is None:
            owner.job_failed(job, outcome.errors.get(name, "no result in its group's statement"))
        else:
            owner.job_done(job, rows, outcome.seconds.get(name, 0.0), go_ready=name in outcome.go_ready)
