"""Special metrics whose server reads ride in the fast lane's statement (issue 14: one statement per tick,
specials included).

A special metric that talks to the server runs in the slow lane, on the source's second connection, with a
statement of its own: change_events sends its five hash queries there at every run. When those reads are
plain queries (the registry's `reads`) and were cheap in the special's last run (under RIDE_SECONDS of
server time), the fast lane adds them to its tick's one statement instead, and the special's job gets
their outcome (`Job.given`): no crossing, no statement and no second connection for it. A read whose SQL
is the one of a metric due in the same tick shares that metric's entry, so the debug preset's
configuration_hashes, say, is read once for both.

Cheap only: reads that took RIDE_SECONDS or more last time (a database with a great many functions or
tables) and a special's first run (no history) keep their own statement in the slow lane, where they can
never delay the fast metrics. A read that fails in the tick's statement (which makes that statement run
each metric alone once) stops riding for that special until the source reconnects: it runs its own
statement again, where its errors are its own.
"""

from __future__ import annotations

import logging

import attrs

from reaper.daemon.cost import SourceCost
from reaper.daemon.jobs import Job
from reaper.db import ServerInfo, TickOutcome

log = logging.getLogger("reaper.daemon.source")

RIDE_SECONDS = 0.05  # a special's last run took less server time than this: its reads may ride

Plan = dict[str, dict[str, str]]  # special -> {read's name: its key in the tick's batch}


@attrs.define
class Rides:
    """One source's riding specials: which may not ride (until the source reconnects)."""

    source: str
    blocked: frozenset[str] = frozenset()  # replaced, not changed: an empty set is 216 bytes a source

    def plan(self, jobs: list[Job], server: ServerInfo, batch: dict[str, str], cost: SourceCost) -> Plan:
        """Add the reads of the due specials that may ride to `batch` (sharing the entry of a due metric with
        the same SQL, else under "special:read"); what was added where."""
        plan: Plan = {}
        for job in jobs:
            spec, name = job.spec, job.metric.name
            if spec is None or spec.reads is None or name in self.blocked:
                continue
            past = cost.metrics.get(name)
            last = None if past is None else past.last_run()
            if last is None or last.seconds >= RIDE_SECONDS:
                continue
            keys: dict[str, str] = {}
            for read, sql in spec.reads(server).items():
                key = read if batch.get(read) == sql else f"{name}:{read}"
                batch[key] = sql
                keys[read] = key
            if keys:
                plan[name] = keys
        return plan

    def take(self, plan: Plan, outcome: TickOutcome, jobs: list[Job]) -> tuple[TickOutcome, list[Job]]:
        """The tick's outcome without the reads no metric asked for, and the jobs, each riding special's with
        its reads' outcome (`Job.given`)."""
        if not plan:
            return outcome, jobs
        given: dict[str, TickOutcome] = {}
        private: set[str] = set()
        for name, keys in plan.items():
            private.update(key for read, key in keys.items() if key != read)
            errors = {read: outcome.errors[key] for read, key in keys.items() if key in outcome.errors}
            if errors:
                self.blocked |= {name}
                log.info("source %s: metric %s: its reads failed in the tick's statement (%s); it sends its own "
                         "statement in the slow lane from now on", self.source, name,
                         "; ".join(f"{read}: {message}" for read, message in sorted(errors.items())))
            given[name] = TickOutcome(
                rows={read: outcome.rows[key] for read, key in keys.items() if key in outcome.rows},
                errors=errors, in_recovery=outcome.in_recovery, statements=0, isolated=False,
                seconds={read: outcome.seconds.get(key, 0.0) for read, key in keys.items()})
        if private:
            outcome = attrs.evolve(outcome, rows={k: v for k, v in outcome.rows.items() if k not in private},
                                   errors={k: v for k, v in outcome.errors.items() if k not in private},
                                   seconds={k: v for k, v in outcome.seconds.items() if k not in private})
        return outcome, [attrs.evolve(job, given=given[job.metric.name]) if job.metric.name in given else job
                         for job in jobs]
