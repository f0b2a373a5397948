"""The process around the daemon: the state-dir lock, the pidfile, signals and the asyncio loop.

    reaper run --config conf/reaper.toml
    └ trio.run(run_daemon)
      ├ the state dir's lock        one daemon per state dir (flock; a second one refuses, naming the first)
      ├ the pidfile                 written once locked, removed at exit if still ours
      ├ signal receiver             installed before anything can be interrupted
      └ db.open_loop()              the process's one asyncio loop, outermost
        └ Daemon.run                the task tree (reaper.daemon.app); its root task runs `watch_signals`

SIGHUP becomes a reload request to the reconciler (the config file is validated as a whole first);
SIGINT/SIGTERM stop gracefully; a second stop signal exits at once. SIGUSR1 drains a fleet member
(`reaper fleet leave`): it releases every source and stays up. SIGUSR2 writes the status file now
(`reaper status` asks for a fresh one so); it is ignored outside the daemon's life, never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import trio

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import Config
from reaper.daemon import memory
from reaper.daemon.app import Daemon, state_dir_of
from reaper.daemon.installed import load_needed
from reaper.daemon.status import LOCK_FILE
from reaper.daemon.systemd import Notifier
from reaper.earlysignals import take_early_signals
from reaper.errors import ConfigError
from reaper.fsutil import make_private_dir

log = logging.getLogger("reaper.daemon.root")



async def watch_signals(signals: AsyncIterator[int], daemon: Daemon, config_path: str | None,
                        force_exit: Callable[[int], None]) -> None:
    """SIGHUP reloads; SIGINT/SIGTERM stop gracefully; a second stop signal exits at once; SIGUSR1 drains a
    fleet member; SIGUSR2 writes the status file now.

    The daemon's root task runs it until a stop is asked (which cancels it), then a task runs it again
    through the shutdown: whether this is a second stop signal is the daemon's state, not this call's."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            if config_path is None or daemon.stopping:
                continue
            log.info("SIGHUP: reloading %s", config_path)
            await daemon.reload(config_path)
        elif signum == signal.SIGUSR2:
            daemon.request_status()
        elif signum == signal.SIGUSR1:
            if daemon.leave_fleet():
                log.warning("SIGUSR1: leaving the fleet: every source is released, the daemon stays up")
            else:
                log.warning("SIGUSR1: ignored: no [fleet] in the configuration")
        elif not daemon.stopping:
            log.info("%s: stopping gracefully (send it again to exit at once)", signal.Signals(signum).name)
            daemon.request_stop()
        else:
            log.warning("%s again: exiting at once", signal.Signals(signum).name)
            force_exit(1)


async def with_early(signals: AsyncIterator[int]) -> AsyncIterator[int]:
    """The signals that came while the daemon started (reaper.launch), then the receiver's."""
    for signum in take_early_signals():
        log.info("%s came while the daemon started: handled now", signal.Signals(signum).name)
        yield signum
    async for signum in signals:
        yield signum


async def run_daemon(config: Config, *, config_path: str | None, force_exit: Callable[[int], None],
                     groups: Sequence[str] | None = None, pidfile: str | None = None) -> None:
    """The daemon: the state dir locked, signal handling installed, then the asyncio loop, then the
    task tree. A state dir locked by another daemon is a ConfigError (one line, naming its pid).
    glibc's malloc is tuned first, and its free heap trimmed after work every 30 s (reaper.daemon.memory)."""
    memory.tune()
    load_needed(config, Catalog.for_config(config))  # what the config uses of reaper: loadable, or one line each
    notifier = Notifier.from_environment()  # systemd's Type=notify and watchdog (reaper.daemon.systemd)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # a late `reaper status` must not kill the process (the default)
    with lock_state_dir(state_dir_of(config)), _pidfile(pidfile), \
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                                      signal.SIGUSR2) as signals:
        async with db.open_loop():
            daemon = Daemon(config, groups=groups, notifier=notifier)

            # the heap trimmed every 30 s and frozen while the fleet settles, after the status writer's checks
            daemon.status_writer.after_check = memory.Housekeeper(daemon.gc).after_check

            async def signal_task(d: Daemon) -> None:
                await watch_signals(with_early(signals), d, config_path, force_exit)

            await daemon.run(signal_task=signal_task)


@contextlib.contextmanager
def lock_state_dir(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on `<state_dir>/reaper.lock` (which holds our pid) while running.

    The lock goes with the process (even on SIGKILL), so a stale lock file never blocks a start."""
    path = state_dir / LOCK_FILE
    try:
        make_private_dir(state_dir)
    except OSError as e:
        raise ConfigError([f"state_dir {state_dir}: cannot create the folder {e.filename or state_dir}: "
                           f"{e.strerror or e}"]) from e
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError([f"state_dir {state_dir}: cannot create {LOCK_FILE}: {e.strerror or e}"]) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError([f"state_dir {state_dir}: cannot lock {LOCK_FILE}: {e.strerror or e}"]) from e
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError([f"state_dir {state_dir} is in use by another reaper daemon (pid {holder}); stop it, "
                               "or give this one a state dir of its own: [collector] state_dir, or for a second "
                               "process on the same config file (another --group, another fleet member) "
                               "STATE_DIRECTORY in its environment (systemd: StateDirectory=reaper/NAME), which a "
                               "config without a state_dir follows"]) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _pidfile(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    pid = str(os.getpid())
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the operator's file: 0600
    with os.fdopen(fd, "w") as f:
        f.write(pid + "\n")
    os.replace(tmp, target)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if target.read_text().strip() == pid:
                target.unlink()
