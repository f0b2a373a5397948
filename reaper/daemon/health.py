"""Health endpoints (`[collector] http_listen`): /liveness, /readiness, /status.

Served by the same bounded HTTP stack as the Prometheus sink (reaper.sinks.http_serve: hypercorn's
protocol, our accept loop with a connection limit), in the daemon's root nursery, for the daemon's
whole life (it answers during shutdown too).

- `GET /liveness`  200 `ok` while the trio loop turns (the answer is produced by a task of that loop;
                   a blocked loop answers nothing, which a prober's timeout reads as dead).
- `GET /readiness` 200 `ready` once every source this process owns has had a first tick attempt (its
                   first connect ended, well or not), every sink has been opened and is not failing,
                   and every `[[sources_from]]` config database has been read once; 503 with the
                   reasons (one per line) otherwise. A fleet member that is draining, has not joined
                   yet or has lost its coordination session is not ready.
- `GET /status`    the `reaper status` document (the status file's JSON), built now.

Anything else is 404; methods other than GET and HEAD are 405. The address is read at start: a
reload that changes `http_listen` takes effect at the next start.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Protocol

import orjson
import trio
from hypercorn.config import Config as HypercornConfig

from reaper.daemon.fleet import FleetMember
from reaper.daemon.reconciler import Reconciler, RunningSource
from reaper.daemon.sinkset import RunningSink
from reaper.daemon.status import DaemonStatus
from reaper.daemon.status import _converter as status_converter
from reaper.sinks.http_serve import answers_get, serve_bounded
from reaper.sinks.prometheus import bind_listen


class Daemon(Protocol):
    """What the endpoints read of the daemon (reaper.daemon.app.Daemon); a Protocol, so that this module
    does not import the one that starts it."""

    fleet: FleetMember | None
    reconciler: Reconciler

    @property
    def sources(self) -> dict[str, RunningSource]: ...

    @property
    def sinks(self) -> dict[str, RunningSink]: ...

    def status(self) -> DaemonStatus: ...

log = logging.getLogger("reaper.daemon.health")
http_log = logging.getLogger("reaper.daemon.health.http")
http_log.setLevel(logging.ERROR)

MAX_CONNECTIONS = 16
LISTEN_BACKLOG = 16
GRACEFUL_TIMEOUT_SECONDS = 2
KEEP_ALIVE_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 10
MAX_NAMED = 5  # a reason names at most this many sources, then counts the rest
TEXT = b"text/plain; charset=utf-8"


def bind_health(listen: str) -> socket.socket:
    """The bound socket for `http_listen` (ConfigError, one line, when the address cannot be had)."""
    return bind_listen(listen, "collector.http_listen")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def not_ready_reasons(daemon: Daemon) -> list[str]:
    """Why the daemon is not ready, one line each; empty when it is."""
    reasons: list[str] = []
    fleet = daemon.fleet
    if fleet is not None:
        if fleet.draining:
            reasons.append(f"fleet member {fleet.member} is draining (left the fleet)")
        elif fleet.error is not None:
            reasons.append(f"fleet member {fleet.member}: {fleet.error}")
        elif fleet.session is None:
            reasons.append(f"fleet member {fleet.member} has no coordination session (not joined yet)")
        elif not fleet.refreshed:  # joined: its sources are claimed and started by its first refresh
            reasons.append(f"fleet member {fleet.member} has joined and is taking its sources")
    # a first tick attempt is over once the source is no longer "starting" (its connect ended: up, down,
    # skipped or paused); a connect that hangs keeps it starting until connect_timeout_seconds
    waiting = sorted(name for name, running in daemon.sources.items()
                     if running.reaper.state.ticks == 0 or running.reaper.state.status == "starting")
    if waiting:
        reasons.append(f"{len(waiting)} of {len(daemon.sources)} sources have not had a first tick yet: "
                       f"{_names(waiting)}")
    for running in daemon.sinks.values():
        outlet = running.outlet
        if (why := outlet.not_writing()) is not None:
            reasons.append(f"sink {outlet.label} is not writing: {why}")
        elif not outlet.opened:
            reasons.append(f"sink {outlet.label} is not open yet")
    for feed in daemon.reconciler.feeds.running.values():
        if feed.reads == 0:
            state = f"cannot be read: {feed.error}" if feed.error else "not read yet"
            reasons.append(f"{feed.config.label} {state}")
    return reasons


class HealthEndpoints:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def serve(self, sock: socket.socket, *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on the bound socket until cancelled; reports the URLs once it listens."""
        config = HypercornConfig()
        config.accesslog = None
        config.errorlog = http_log
        config.graceful_timeout = GRACEFUL_TIMEOUT_SECONDS
        config.keep_alive_timeout = KEEP_ALIVE_SECONDS
        config.read_timeout = READ_TIMEOUT_SECONDS
        never = trio.Event()  # stopped by cancellation: the endpoints live as long as the daemon
        await serve_bounded(self.asgi, config, sock, max_connections=MAX_CONNECTIONS, backlog=LISTEN_BACKLOG,
                            shutdown=never, log=log, label="health endpoints", task_status=task_status)

    def answer(self, path: str) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for a GET of `path`."""
        if path == "/liveness":
            return 200, TEXT, b"ok\n"
        if path == "/readiness":
            reasons = not_ready_reasons(self.daemon)
            if reasons:
                return 503, TEXT, ("not ready:\n" + "".join(f"{r}\n" for r in reasons)).encode()
            return 200, TEXT, b"ready\n"
        if path == "/status":
            document = status_converter.unstructure(self.daemon.status())
            return 200, b"application/json", orjson.dumps(document)
        return 404, TEXT, b"not found: /liveness, /readiness or /status\n"

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not await answers_get(scope, receive, send):
            return
        status, content_type, body = self.answer(scope["path"].rstrip("/") or "/")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


async def serve_health(daemon: Daemon, sock: socket.socket, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The health endpoints' task (in the daemon's root nursery)."""
    endpoints = HealthEndpoints(daemon)
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(endpoints.serve, sock)
        log.info("health endpoints: %s/liveness, /readiness, /status", urls[0])
        task_status.started()
