"""The daemon's signal handling (reaper.daemon.root.watch_signals) in a real Daemon task tree: the root task
watches the signals itself until a stop is asked, and a second stop signal during a slow shutdown exits at once."""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import trio
from test_aioloop import _all_tasks as all_tasks

from reaper import db
from reaper.config.schema import CollectorConfig, Config
from reaper.daemon.app import Daemon
from reaper.daemon.root import watch_signals
from reaper.measurement import Measurement


class SlowToClose:
    """A sink whose close waits until the test lets it go (a shutdown that takes its time)."""

    label = "slow-to-close"
    spillable = False

    def __init__(self) -> None:
        self.closing = trio.Event()
        self.release = trio.Event()

    async def open(self, beside: trio.Nursery | None = None) -> None:
        pass

    async def write(self, batch: list[Measurement]) -> None:
        pass

    async def aclose(self) -> None:
        self.closing.set()
        await self.release.wait()


def task_names() -> list[str]:
    return [task.name for task in all_tasks()]


async def test_a_second_stop_signal_during_a_slow_shutdown_exits_at_once(tmp_path: Path) -> None:
    sink = SlowToClose()
    config = Config(collector=CollectorConfig(state_dir=str(tmp_path / "state"), shutdown_grace_seconds=60))
    daemon = Daemon(config, extra_sinks=[sink])
    send, receive = trio.open_memory_channel[int](10)
    exits: list[int] = []

    def force_exit(code: int) -> None:
        exits.append(code)
        sink.release.set()  # (the real one ends the process here)

    async def signal_task(d: Daemon) -> None:
        await watch_signals(receive, d, None, force_exit)

    with trio.fail_after(30):
        async with db.open_loop(), trio.open_nursery() as nursery:
            await nursery.start(functools.partial(daemon.run, signal_task=signal_task))
            await send.send(signal.SIGUSR2)  # handled by the root task: the daemon runs no task of its own for it
            assert not any("signal_task" in name for name in task_names())
            await send.send(signal.SIGTERM)
            await sink.closing.wait()  # the shutdown is under way, held up by the sink
            assert daemon.stopping and not exits
            await send.send(signal.SIGHUP)  # ignored while stopping (no config path, and stopping anyway)
            await send.send(signal.SIGTERM)
    assert exits == [1]


async def test_a_stop_asked_from_inside_ends_the_signal_watch_and_the_daemon(tmp_path: Path) -> None:
    """request_stop() from elsewhere (the demo, a test) while the root task waits on the signals."""
    config = Config(collector=CollectorConfig(state_dir=str(tmp_path / "state"), shutdown_grace_seconds=5))
    daemon = Daemon(config)
    _send, receive = trio.open_memory_channel[int](10)
    exits: list[int] = []

    async def signal_task(d: Daemon) -> None:
        await watch_signals(receive, d, None, exits.append)

    with trio.fail_after(30):
        async with db.open_loop(), trio.open_nursery() as nursery:
            await nursery.start(functools.partial(daemon.run, signal_task=signal_task))
            daemon.request_stop()
    assert exits == [] and daemon.stopping
