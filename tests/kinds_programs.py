"""Real PgBouncer, Pgpool-II and etcd processes for the source-kind tests (tests/test_kinds_*.py).

Debian's packages: `apt-get install -y --no-install-recommends pgbouncer pgpool2 etcd-server etcd-client patroni`.
`require_program` installs a missing one (as root, when apt-get is there) and otherwise skips the
test with the reason. Each program runs on a free loopback port from its own directory under
/var/tmp (PgBouncer and Pgpool-II as the `postgres` OS user: they refuse root or should not run as
it), and `stop()` ends it (SIGTERM, then SIGKILL) and removes the directory.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from pgserver import ServerHandle

APT_PACKAGES = ["pgbouncer", "pgpool2", "etcd-server", "etcd-client", "patroni"]
BASE_DIR = Path("/var/tmp/reaper-kinds")
START_TIMEOUT = 30.0


def _apt_install(package: str) -> str | None:
    """Install one Debian package; None on success, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("apt-get") is None:
        return "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    for attempt in range(2):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        if proc.returncode == 0:
            return None
        if attempt == 0:  # stale package lists: refresh once
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    return (proc.stderr.strip().splitlines() or ["apt-get failed"])[-1]


def require_program(binary: str, package: str) -> str:
    """The path of `binary`, installing Debian's `package` if it is missing; skips the test if impossible."""
    found = shutil.which(binary) or next(
        (str(p) for p in (Path("/usr/sbin") / binary, Path("/usr/bin") / binary) if p.exists()), None)
    if found:
        return found
    why = _apt_install(package)
    found = shutil.which(binary) or next(
        (str(p) for p in (Path("/usr/sbin") / binary, Path("/usr/bin") / binary) if p.exists()), None)
    if found:
        return found
    pytest.skip(f"{binary} is not installed and `apt-get install {package}` failed: {why}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {START_TIMEOUT:g}s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Program:
    """A started program in its own directory."""

    def __init__(self, name: str, *, as_postgres: bool) -> None:
        BASE_DIR.mkdir(parents=True, exist_ok=True)
        os.chmod(BASE_DIR, 0o1777)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=BASE_DIR))
        os.chmod(self.dir, 0o755)
        self.name = name
        self.as_postgres = as_postgres and os.geteuid() == 0
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "output.log"

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def start(self, cmd: list[str], *, port: int | None = None) -> None:
        as_user: dict[str, object] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            for p in [self.dir, *self.dir.iterdir()]:
                os.chown(p, pw.pw_uid, pw.pw_gid)
            as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            env.update(HOME=pw.pw_dir, USER="postgres", LOGNAME="postgres")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, env=env, start_new_session=True,
                                         **as_user)  # type: ignore[call-overload]
        try:
            wait_for_port(port or self.port, self.proc, self.name, self.log)
        except BaseException:
            self.stop(remove=False)
            raise

    def stop(self, *, remove: bool = True) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # its own session: the program and its children (Pgpool-II's, Patroni's PostgreSQL) go together
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            deadline = time.monotonic() + 10  # Pgpool-II's children outlive their parent briefly
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def terminate(self, timeout: float = 60.0) -> None:
        """SIGTERM to the program alone and wait: its own graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return _tail(self.log, 200)


def start_pgbouncer(pg: ServerHandle, *, admin: str, password: str) -> Program:
    """PgBouncer on a free loopback port in front of `pg`, with `admin` in admin_users (SCRAM auth)."""
    exe = require_program("pgbouncer", "pgbouncer")
    prog = Program("pgbouncer", as_postgres=True)
    prog.write("userlist.txt", f'"{admin}" "{password}"\n')
    ini = prog.write("pgbouncer.ini", f"""[databases]
postgres = host={pg.host} port={pg.port} dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {prog.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {prog.dir}/userlist.txt
admin_users = {admin}
logfile = {prog.dir}/pgbouncer.log
pidfile = {prog.dir}/pgbouncer.pid
""")
    prog.start([exe, str(ini)])
    return prog


def start_pooler(pg: ServerHandle, *, pool_mode: str = "transaction", pool_size: int = 1,
                 ignore_startup_parameters: str = "") -> Program:
    """PgBouncer pooling every database of `pg` for its `postgres` role (trust): what a DBA puts in front of
    a server, monitored through it like the applications are (a `postgres` source, not the admin console)."""
    exe = require_program("pgbouncer", "pgbouncer")
    prog = Program("pooler", as_postgres=True)
    prog.write("userlist.txt", '"postgres" ""\n')
    ignore = f"ignore_startup_parameters = {ignore_startup_parameters}\n" if ignore_startup_parameters else ""
    ini = prog.write("pgbouncer.ini", f"""[databases]
* = host={pg.host} port={pg.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {prog.port}
unix_socket_dir =
auth_type = trust
auth_file = {prog.dir}/userlist.txt
pool_mode = {pool_mode}
default_pool_size = {pool_size}
{ignore}logfile = {prog.dir}/pgbouncer.log
pidfile = {prog.dir}/pgbouncer.pid
""")
    prog.start([exe, str(ini)])
    return prog


def start_pgpool(pg: ServerHandle) -> Program:
    """Pgpool-II (streaming-replication mode, one backend: `pg`) on a free loopback port; trust auth."""
    exe = require_program("pgpool", "pgpool2")
    prog = Program("pgpool", as_postgres=True)
    conf = prog.write("pgpool.conf", f"""backend_clustering_mode = 'streaming_replication'
listen_addresses = '127.0.0.1'
port = {prog.port}
unix_socket_directories = '{prog.dir}'
pcp_listen_addresses = ''
pcp_port = {free_port()}
pcp_socket_dir = '{prog.dir}'
backend_hostname0 = '{pg.host}'
backend_port0 = {pg.port}
backend_weight0 = 1
backend_flag0 = 'ALLOW_TO_FAILOVER'
enable_pool_hba = off
pid_file_name = '{prog.dir}/pgpool.pid'
logdir = '{prog.dir}'
health_check_period = 0
sr_check_period = 0
sr_check_user = 'postgres'
num_init_children = 4
max_pool = 2
use_watchdog = off
failover_on_backend_error = off
memory_cache_enabled = off
""")
    pcp = prog.write("pcp.conf", "")
    prog.start([exe, "-n", "-f", str(conf), "-F", str(pcp)])
    return prog


class Etcd(Program):
    """A one-member etcd; `put`/`delete` write keys through its v3 JSON gateway, as Patroni's client does."""

    def __init__(self) -> None:
        super().__init__("etcd", as_postgres=False)
        self.exe = require_program("etcd", "etcd-server")
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self) -> None:
        self.start([self.exe, "--name", "reaper-test", "--data-dir", str(self.dir / "data"),
                    "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                    "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                    "--initial-cluster", f"reaper-test=http://127.0.0.1:{self.peer_port}"])
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the port opens before the member can serve requests
            try:
                self.call("/v3/kv/range", {"key": _b64("/")})
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def call(self, path: str, body: dict[str, object], token: str | None = None) -> dict[str, object]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            result: dict[str, object] = json.loads(resp.read())
            return result

    def put(self, key: str, value: str, token: str | None = None) -> None:
        self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, token)

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key)})


def start_patroni(etcd: Etcd, *, scope: str, name: str, bindir: Path) -> Program:
    """A Patroni member (Debian's patroni) of cluster `scope`, its DCS `etcd` (v3 API), PostgreSQL from
    `bindir`, trust auth on loopback. The first member bootstraps the cluster; later ones clone it."""
    exe = require_program("patroni", "patroni")
    prog = Program(f"patroni-{name}", as_postgres=True)
    pg_port = free_port()
    config = prog.write("patroni.yml", json.dumps({  # JSON is YAML
        "scope": scope, "namespace": "/service/", "name": name,
        "restapi": {"listen": f"127.0.0.1:{prog.port}", "connect_address": f"127.0.0.1:{prog.port}"},
        "etcd3": {"hosts": f"127.0.0.1:{etcd.port}"},
        "bootstrap": {
            "dcs": {"ttl": 10, "loop_wait": 1, "retry_timeout": 5},
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            "pg_hba": ["local all all trust", "host all all 127.0.0.1/32 trust",
                       "host replication all 127.0.0.1/32 trust"],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{pg_port}", "connect_address": f"127.0.0.1:{pg_port}",
            "data_dir": str(prog.dir / "data"), "bin_dir": str(bindir), "pgpass": str(prog.dir / "pgpass"),
            "authentication": {"superuser": {"username": "postgres"}, "replication": {"username": "postgres"}},
            "parameters": {"unix_socket_directories": str(prog.dir), "fsync": "off"},
        },
    }))
    prog.start([exe, str(config)])
    return prog


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
