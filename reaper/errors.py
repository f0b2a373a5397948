"""The error vocabulary that drives supervision.

- ConfigError: the configuration is wrong; carries one line per problem.
- SourceUnavailable: the source cannot be reached right now; retried forever with backoff.
- MetricError: one metric failed; skipped and counted, never kills the source.
- SinkError: a sink cannot open or write right now (an outage); the batch is kept (spilled) and retried.
- SinkRejected: a sink refuses a measurement for its content (a value it cannot encode, a storage
  data exception such as a NUL byte); the measurement is set aside in `rejected/`, never retried.
Anything else is a bug: the supervisor restarts the task within a limit (a sink's task logs it with its
traceback once and sets the measurement aside, as for SinkRejected).
"""

from __future__ import annotations


class ReaperError(Exception):
    """Base of every expected reaper error."""


class ConfigError(ReaperError):
    """An invalid configuration. `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def config_problems(error: BaseException) -> list[str] | None:
    """The problem lines of a ConfigError, also one that trio's nurseries wrapped in exception groups (with
    nothing else in them); None for anything else."""
    if isinstance(error, ConfigError):
        return error.problems
    if isinstance(error, BaseExceptionGroup):
        found, rest = error.split(ConfigError)
        if found is not None and rest is None:
            return [line for e in _leaves(found) for line in e.problems]
    return None


def _leaves(group: BaseExceptionGroup[ConfigError]) -> list[ConfigError]:
    return [leaf for e in group.exceptions
            for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]


class SourceUnavailable(ReaperError):
    """The source cannot be reached or refuses us (network, auth, timeout, shutdown)."""


class MetricError(ReaperError):
    """A single metric's query failed; the others are unaffected."""

    def __init__(self, metric: str, message: str) -> None:
        self.metric = metric
        self.message = message
        super().__init__(f"{metric}: {message}")


class MetricUnavailable(MetricError):
    """A metric that cannot be collected for this source at all (e.g. an OS metric when reaper is not on
    the server's host): skipped with one warning, not counted as a failure."""


class SinkError(ReaperError):
    """A sink cannot open or write right now (an outage): retried with backoff, measurements spill meanwhile."""


class SinkRejected(ReaperError):
    """A sink refuses what it was given for its content, not for an outage: retrying cannot help."""
