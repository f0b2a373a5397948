"""Running a host tool (pgbackrest, wal-g, smartctl) for a special metric: where, how long, what if absent.

Where: a source's `specials.command_prefix` ("sudo -n -u postgres", "ssh backup-host") is put in front
of every tool command, and then reaper need not run on the server's host (the operator said where the
tool runs); without a prefix the tool runs here, and only when this is the server's host (the OS metrics'
rule, `osmetrics.require_server_host`).

How long: each command runs under `trio.fail_after(seconds)` (trio.run_process: the trio thread never
blocks; on the deadline the process is terminated, then killed). A missing tool or one reaper's user
may not execute raises MetricUnavailable, naming the Debian package: one warning for the source, no
error line per tick.

How often: a verdict that will not change from one run to the next (the tool is missing or may not be
executed, it is not configured for this server, smartctl says a device has no SMART) is kept in the
metric's state for VERDICT_SECONDS (`with_verdict`): the runs meanwhile repeat it (the same
MetricUnavailable, said once by the source; the same failure row with the run's epoch_ns) without
spawning the tool. A tool that answers is run every interval (a backup's age must be fresh).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
import trio

from reaper.errors import MetricUnavailable
from reaper.special import Result, SpecialContext
from reaper.special.osmetrics import require_server_host

TOOL_SECONDS = 30.0  # one tool call (pgwatch's helpers give pgbackrest the same)
VERDICT_SECONDS = 600.0  # a missing, unconfigured or unsupported tool is not asked again for this long
VERDICT_STATE = "_verdict"  # its key in ctx.state


class ToolTimeout(Exception):
    """The tool did not finish within its deadline (it was terminated)."""

    def __init__(self, command: str, seconds: float) -> None:
        self.command = command
        self.seconds = seconds
        super().__init__(f"{command} did not answer within {seconds:g} s")


@attrs.frozen
class ToolResult:
    returncode: int
    stdout: bytes
    stderr: str

    def last_error_line(self) -> str:
        """The most telling line of stderr (an ERROR line if any, else the last non-empty one)."""
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line or "error" in line.lower()]
        return (errors or lines or ["(no message)"])[0 if errors else -1]


def command_prefix(ctx: SpecialContext) -> list[str]:
    return shlex.split(ctx.source.specials.command_prefix)


async def check_where(ctx: SpecialContext) -> list[str]:
    """The command prefix; without one, MetricUnavailable unless reaper runs on the server's host."""
    prefix = command_prefix(ctx)
    if not prefix:
        await require_server_host(ctx)
    return prefix


async def run_tool(ctx: SpecialContext, argv: Sequence[str], *, package: str, prefix: Sequence[str] = (),
                   env: Mapping[str, str] | None = None, seconds: float = TOOL_SECONDS) -> ToolResult:
    """Run `prefix + argv` with stdin closed, its output captured; any exit code is returned.

    Raises MetricUnavailable when the program (the prefix's, or the tool's) is missing or not executable,
    ToolTimeout after `seconds`.
    """
    command = [*prefix, *argv]
    full_env = {**os.environ, **env} if env else None
    try:
        with trio.fail_after(seconds):
            proc = await trio.run_process(command, stdin=b"", capture_stdout=True, capture_stderr=True,
                                          check=False, env=full_env)
    except trio.TooSlowError:
        raise ToolTimeout(shlex.join(argv[:3]), seconds) from None
    except FileNotFoundError:
        raise MetricUnavailable(ctx.metric.name, _missing(command[0], argv[0], package, bool(prefix))) from None
    except PermissionError:
        raise MetricUnavailable(ctx.metric.name, f"reaper's user may not execute {command[0]} (it needs execute "
                                                 "permission on it)") from None
    stderr = proc.stderr.decode("utf-8", "replace")
    if prefix and proc.returncode in (126, 127) and argv[0] in stderr and _not_found(stderr):
        # sudo/ssh ran, the tool did not: "command not found" is the same problem as a missing tool
        raise MetricUnavailable(ctx.metric.name, _missing(argv[0], argv[0], package, True))
    return ToolResult(proc.returncode, proc.stdout, stderr)


def _not_found(stderr: str) -> bool:
    text = stderr.lower()
    return "not found" in text or "no such file" in text


def _missing(program: str, tool: str, package: str, prefixed: bool) -> str:
    if program != tool:
        return f"the command prefix's program {program} is not installed or not on reaper's PATH"
    where = "where the command prefix runs it" if prefixed else "on reaper's PATH"
    how = package if " " in package else f"Debian package {package}"  # (a phrase where there is no package)
    return f"{tool} is not installed or not {where} ({how})"


def denied(text: str) -> bool:
    """True when a tool's message says the operating system refused access."""
    lowered = text.lower()
    return "permission denied" in lowered or "operation not permitted" in lowered


@attrs.frozen
class Verdict:
    """What a run found that the next runs would find again: MetricUnavailable's message, or a result."""

    key: tuple[str, ...]  # the command (prefix, argv, configuration): another one is asked afresh
    until: float  # trio time
    unavailable: str | None = None
    result: Result = attrs.field(factory=list)


def _again(result: Result, wall_ns: int) -> Result:
    return [(table, [{**row, "epoch_ns": wall_ns} for row in rows]) for table, rows in result]


async def with_verdict(ctx: SpecialContext, key: tuple[str, ...],
                       run: Callable[[], Awaitable[tuple[Result, bool]]]) -> Result:
    """`run()` -> (result, settled), or the kept verdict of an earlier run of the same `key`.

    A MetricUnavailable from `run` is kept for VERDICT_SECONDS, and so is a result `run` calls settled
    (a failure that only the operator can change); other results are not kept.
    """
    now = trio.current_time()
    kept: Verdict | None = ctx.state.get(VERDICT_STATE)
    if kept is not None and kept.key == key and now < kept.until:
        if kept.unavailable is not None:
            raise MetricUnavailable(ctx.metric.name, kept.unavailable)
        return _again(kept.result, ctx.wall_ns)
    ctx.state.pop(VERDICT_STATE, None)
    try:
        result, settled = await run()
    except MetricUnavailable as e:
        ctx.state[VERDICT_STATE] = Verdict(key, now + VERDICT_SECONDS, unavailable=e.message)
        raise
    if settled:
        ctx.state[VERDICT_STATE] = Verdict(key, now + VERDICT_SECONDS, result=result)
    return result
