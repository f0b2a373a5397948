"""A bounded HTTP server for an ASGI app inside the trio tree: hypercorn's HTTP protocol, our accept loop.

Why not `hypercorn.trio.serve`: it accepts without limit (trio.serve_listeners), so a connection flood
on a metrics endpoint takes every file handle of the process (the sources then fail with "Too many
open files", the status file cannot be written), and each EMFILE on accept is logged with a traceback.

Here:
- at most `max_connections` connections are open at once. While all are taken the loop does not
  accept, so further clients wait in the kernel's listen backlog (`backlog`, bounded; beyond it the
  kernel refuses them) and no file handle of ours is spent on them;
- an idle client is dropped after hypercorn's keep-alive timeout, a client that stops sending
  mid-request after `read_timeout` (the caller's HypercornConfig), so slow clients free their slots;
- EMFILE, ENFILE, ENOBUFS or ENOMEM on accept (the process is short of handles anyway) is one warning
  line per minute, with the count, never a traceback; the loop backs off and tries again.
- shutdown: stop accepting, let open requests finish within `config.graceful_timeout`, then cancel.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import repr_socket_addr, wrap_app

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_SECONDS = 0.5
WARN_EVERY_SECONDS = 60.0


class ThrottledWarning:
    """One log line per `every` seconds (trio clock) for a recurring condition, with the count since."""

    def __init__(self, log: logging.Logger, every: float = WARN_EVERY_SECONDS) -> None:
        self.log = log
        self.every = every
        self.suppressed = 0
        self._last: float | None = None

    def __call__(self, text: str) -> None:
        now = trio.current_time()
        if self._last is not None and now - self._last < self.every:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last such line)" if self.suppressed else ""
        self.log.warning("%s%s; at most one such line per %gs", text, more, self.every)
        self._last, self.suppressed = now, 0


async def answers_get(scope: Any, receive: Callable[[], Awaitable[Any]],
                      send: Callable[[dict[str, Any]], Awaitable[Any]]) -> bool:
    """What every reaper endpoint does before it answers: completes the ASGI lifespan (hypercorn asks),
    ignores non-HTTP scopes, answers 405 to anything but GET/HEAD. True when the request is for the caller."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return False
    if scope["type"] != "http":
        return False
    if scope["method"] not in ("GET", "HEAD"):
        await send({"type": "http.response.start", "status": 405, "headers": [(b"allow", b"GET, HEAD")]})
        await send({"type": "http.response.body", "body": b""})
        return False
    return True


async def serve_bounded(app: Callable[..., Awaitable[Any]], config: HypercornConfig, sock: socket.socket, *,
                        max_connections: int, backlog: int, shutdown: trio.Event, log: logging.Logger,
                        label: str, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on the bound socket `sock` (this function owns it from here) until `shutdown` is set.
    Reports the URLs once it listens."""
    sock.listen(backlog)
    sock.setblocking(False)
    url = f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    slots = trio.Semaphore(max_connections)
    warn = ThrottledWarning(log)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            await TCPServer(wrapped, config, context, {}, stream).run()  # type: ignore[arg-type]
        finally:
            slots.release()

    async def accept_loop(handlers: trio.Nursery) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as e:
                slots.release()
                if e.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                warn(f"sink {label}: cannot accept a connection on {url}: {e.strerror} "
                     f"({errno.errorcode.get(e.errno or 0, e.errno)}); backing off")
                await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                continue
            handlers.start_soon(connection, stream)

    task_status.started([url])  # it listens: connects queue in the backlog until the loop accepts them
    try:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(accept_loop, handlers)
                await shutdown.wait()
                acceptor.cancel_scope.cancel()
            with trio.move_on_after(1, shield=True):
                await listener.aclose()
            await context.terminated.set()  # keep-alive connections close after their current request
            handlers.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
    finally:
        listener.socket.close()
