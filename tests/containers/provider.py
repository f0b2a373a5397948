"""Which PostgreSQL the test fixtures get: local binaries (tests/pgserver.py) or a Docker container.

``REAPER_TEST_PG=local|docker`` chooses; unset means docker when a Docker engine answers and the
image for PostgreSQL 15 is present, else local. ``choose_provider()`` says which and why, in one line
for the pytest header. ``open_server(choice, major)`` gives a server with the fixture interface
(``dsn()``, ``psql()``, ``major``, ``host``, ``port``) from either provider.

Images: ``REAPER_TEST_PG_IMAGE_<major>``, else ``REAPER_TEST_PG_IMAGE``, else ``reaper-test-pg:<major>``
(built by tests/containers/build-image.sh). The official ``postgres:<major>`` images work too: the
container gets the same command line (``postgres -c ...``) and ``PGPORT``. Containers run with
host networking on a free loopback port; their data directory is a bind mount of a host directory
at the same path, so in-process OS metrics (which read the data directory) see what the server sees.
Stopping and restarting a container server is not offered: those tests skip under docker.

The Docker probe speaks HTTP over the engine's socket itself and closes it: no docker client is
built before we know an engine answers (a failed client leaks a socket, a ResourceWarning that
``filterwarnings = error`` turns into a failed run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import pytest
from pgserver import DEFAULT_SETTINGS, PG_ROOT, PgServer, PgServerError, ServerHandle, _ensure_shared_dir, _free_port

PROVIDER_ENV = "REAPER_TEST_PG"
IMAGE_ENV = "REAPER_TEST_PG_IMAGE"
DEFAULT_MAJOR = 15
START_TIMEOUT = 120.0  # seconds: container creation on the vfs storage driver copies the image (~7 s here)
PORT_ATTEMPTS = 3
LABEL = "org.reaper.test-owner-pid"  # containers we start carry our pid: leftovers of killed runs are removed
DATA_ROOT = PG_ROOT / "docker"


@dataclass(frozen=True)
class Choice:
    name: str  # "local" or "docker"
    reason: str

    def header(self) -> str:
        return f"reaper test PostgreSQL: {self.name} ({self.reason})"


def image_for(major: int) -> str:
    return os.environ.get(f"{IMAGE_ENV}_{major}") or os.environ.get(IMAGE_ENV) or f"reaper-test-pg:{major}"


# --------------------------------------------------------------------------------------------
# the engine probe: raw HTTP on the socket, always closed


def _engine_address() -> tuple[str, Any] | None:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return ("unix", host.removeprefix("unix://"))
    if host.startswith("tcp://"):
        name, _, port = host.removeprefix("tcp://").rstrip("/").rpartition(":")
        return ("tcp", (name, int(port)))
    if host:
        return None
    return ("unix", "/var/run/docker.sock")


def _engine_get(path: str, timeout: float = 2.0) -> int | None:
    """HTTP status of GET ``path`` on the Docker engine, None when nothing answers."""
    address = _engine_address()
    if address is None:
        return None
    kind, where = address
    if kind == "unix" and not os.path.exists(where):
        return None
    sock = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(where)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        status_line = sock.recv(256).split(b"\r\n", 1)[0].split()
        return int(status_line[1]) if len(status_line) >= 2 else None
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def engine_answers() -> bool:
    return _engine_get("/_ping") == 200


def image_present(image: str) -> bool:
    return _engine_get(f"/images/{quote(image, safe='')}/json") == 200


def choose_provider() -> Choice:
    asked = os.environ.get(PROVIDER_ENV, "").strip().lower()
    if asked not in ("", "local", "docker"):
        raise pytest.UsageError(f"{PROVIDER_ENV} must be 'local' or 'docker', got {asked!r}")
    image = image_for(DEFAULT_MAJOR)
    if asked == "local":
        return Choice("local", f"{PROVIDER_ENV}=local")
    if asked == "docker":
        if not engine_answers():
            raise pytest.UsageError(f"{PROVIDER_ENV}=docker but no Docker engine answers "
                                    f"({os.environ.get('DOCKER_HOST') or '/var/run/docker.sock'})")
        return Choice("docker", f"{PROVIDER_ENV}=docker, image {image}")
    if not engine_answers():
        return Choice("local", f"no Docker engine answers; {PROVIDER_ENV}=docker to insist")
    if not image_present(image):
        return Choice("local", f"a Docker engine answers but image {image} is not present: "
                               "tests/containers/build-image.sh (or `just test-image`) builds it")
    return Choice("docker", f"a Docker engine answers and image {image} is present")


# --------------------------------------------------------------------------------------------
# the container server


def _remove_stale_containers() -> None:
    """Remove containers whose owning test process is gone (killed runs)."""
    import docker  # only imported once an engine answered

    client = docker.from_env()
    try:
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            pid = int(container.labels.get(LABEL, "0") or 0)
            if pid <= 0 or not _pid_alive(pid):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
    finally:
        client.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DockerServer:
    """A PostgreSQL server in a container (host networking): the PgServer client interface."""

    host = "127.0.0.1"

    def __init__(self, container: Any, image: str, port: int, data_root: Path) -> None:
        self._container = container
        self.image = image
        self.port = port
        self._data_root = data_root
        self._major: int | None = None

    @classmethod
    def create(cls, major: int = DEFAULT_MAJOR, settings: Mapping[str, str] | None = None) -> DockerServer:
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # its image needs a registry; we clean up
        from testcontainers.core.container import DockerContainer

        image = image_for(major)
        args = ["postgres"]
        for key, value in {**DEFAULT_SETTINGS, **(settings or {})}.items():
            args += ["-c", f"{key}={value}"]
        _ensure_shared_dir(PG_ROOT)
        _ensure_shared_dir(DATA_ROOT)
        last_error: Exception | None = None
        for _ in range(PORT_ATTEMPTS):
            port = _free_port(cls.host)
            data_root = Path(tempfile.mkdtemp(prefix=f"pg{major}-", dir=DATA_ROOT))
            os.chmod(data_root, 0o755)  # the container's postgres user makes data/ in it
            pgdata = data_root / "data"
            container = (
                DockerContainer(image)
                .with_command([*args, "-p", str(port), "-c", f"listen_addresses={cls.host}"])
                .with_env("PGPORT", str(port))
                .with_env("PGDATA", str(pgdata))
                .with_env("POSTGRES_HOST_AUTH_METHOD", "trust")  # official images: no password
                .with_volume_mapping(str(data_root), str(data_root), mode="rw")
                .with_kwargs(network_mode="host", labels={LABEL: str(os.getpid())})
            )
            server = cls(container, image, port, data_root)
            try:
                container.start()
                server._wait_ready()
                return server
            except PgServerError as e:
                last_error = e
                server.cleanup()
            except BaseException:
                server.cleanup()
                raise
        raise PgServerError(f"no container from {image} came up in {PORT_ATTEMPTS} attempts: {last_error}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        probe = ["psql", "-X", "-At", "-h", self.host, "-p", str(self.port), "-U", "postgres", "-c", "select 1"]
        while True:
            if self._status() in ("exited", "dead"):
                raise PgServerError(f"container from {self.image} exited:\n{self._logs_tail()}")
            if self._exec(probe)[0] == 0 and self._host_can_connect():
                return
            if time.monotonic() > deadline:
                raise PgServerError(f"{self.image} did not accept connections within {START_TIMEOUT:g} s:\n"
                                    f"{self._logs_tail()}")
            time.sleep(0.2)  # polling the server's readiness, not synchronising a test

    def _host_can_connect(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=2):
            return True
        return False

    def _logs_tail(self, lines: int = 40) -> str:
        try:
            out, err = self._container.get_logs()
        except Exception as e:  # the container may be gone: say so instead of hiding the first error
            return f"(no logs: {e})"
        text = (out + err).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    @property
    def major(self) -> int:
        if self._major is None:
            self._major = int(self.psql("show server_version_num")) // 10000
        return self._major

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None) -> str:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def psql(self, sql: str, dbname: str = "postgres", user: str = "postgres", *, timeout: float = 120) -> str:
        """Like PgServer.psql: the host's psql over TCP when there is one, else psql in the container."""
        opts = ["-X", "-v", "ON_ERROR_STOP=1", "-At", "-q", "-h", self.host, "-p", str(self.port),
                "-U", user, "-d", dbname, "-f", "-"]
        exe = shutil.which("psql")
        if exe is not None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            env["PGCONNECT_TIMEOUT"] = "10"
            try:
                proc = subprocess.run([exe, *opts], input=sql, capture_output=True, text=True,
                                      timeout=timeout, env=env)
            except subprocess.TimeoutExpired as e:
                raise PgServerError(f"psql timed out after {timeout} s") from e
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        else:
            shell = 'printf "%s" "$REAPER_SQL" | psql "$@"'
            code, out = self._exec(["sh", "-c", shell, "psql", *opts], environment={"REAPER_SQL": sql})
            err = ""
        if code != 0:
            raise PgServerError(f"psql failed (exit {code})\n--- stderr ---\n{(err or out).strip()}")
        return out.removesuffix("\n")

    def stop(self, mode: str = "fast") -> NoReturn:
        pytest.skip("stops and restarts its server: local servers only (REAPER_TEST_PG=local)")

    def start(self) -> NoReturn:
        pytest.skip("stops and restarts its server: local servers only (REAPER_TEST_PG=local)")

    def is_running(self) -> bool:
        return self._status() == "running"

    def _status(self) -> str:
        """docker-py's container status ("running", "exited", ...), or "not started"."""
        try:
            wrapped = self._container.get_wrapped_container()
        except Exception:  # testcontainers' ContainerStartException: never created
            return "not started"
        wrapped.reload()
        return str(wrapped.status)

    def _exec(self, cmd: list[str], **kwargs: Any) -> tuple[int, str]:
        """docker exec (docker-py's exec_run): exit code and combined output."""
        result = self._container.get_wrapped_container().exec_run(cmd, **kwargs)
        return int(result.exit_code), result.output.decode(errors="replace")

    def cleanup(self) -> None:
        """Remove the container and its data directory.

        The files belong to the container's postgres user, which a non-root host user cannot delete:
        they are deleted from inside (as root there) just before the container is killed."""
        with contextlib.suppress(Exception):
            if self.is_running():
                self._exec(["rm", "-rf", str(self._data_root / "data")], user="0")
        with contextlib.suppress(Exception):
            self._container.stop()  # docker rm -f, and closes the client's connections
        shutil.rmtree(self._data_root, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<DockerServer {self.image} {self.host}:{self.port}>"


@contextlib.contextmanager
def open_server(choice: Choice, major: int = DEFAULT_MAJOR,
                settings: Mapping[str, str] | None = None) -> Iterator[ServerHandle]:
    """A fresh server from the chosen provider, removed on exit."""
    if choice.name == "local":
        with PgServer.create(major=major, settings=settings) as local:
            yield local
        return
    _remove_stale_containers()
    server = DockerServer.create(major=major, settings=settings)
    try:
        yield server
    finally:
        server.cleanup()
