"""The peer: Debian's prometheus-postgres-exporter on the same server, scraped at reaper's tick."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.peer")

PACKAGE = "prometheus-postgres-exporter"
BINARY = "prometheus-postgres-exporter"


def find_or_install() -> tuple[str | None, str]:
    """The exporter's path and version; installs the Debian package when missing (root + apt-get)."""
    path = shutil.which(BINARY)
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE]
        log.info("installing %s with apt-get", PACKAGE)
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
        path = shutil.which(BINARY)
    if path is None:
        return None, f"{PACKAGE} is not installed and could not be installed (needs root and apt-get)"
    proc = subprocess.run([path, "--version"], capture_output=True, text=True)
    text = (proc.stdout + proc.stderr).strip().splitlines()
    version = text[0] if text else "?"
    return path, version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    """Runs the exporter (auto-discovering every database of the server, like reaper's sources cover
    them) and scrapes it every `interval` seconds from a thread; records each scrape."""

    def __init__(self, binary: str, dsn: str, interval: float, workdir: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.preexec: Callable[[], None] | None = None  # e.g. run.die_with_parent
        self.binary = binary
        self.dsn = dsn
        self.interval = interval
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.scrapes: list[dict[str, Any]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_file: Any = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DATA_SOURCE"))}
        env["DATA_SOURCE_NAME"] = self.dsn
        cmd = [self.binary, f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
               "--auto-discover-databases"]
        self._log_file = open(self.workdir / "exporter.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=self.preexec)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)

    def start_scraping(self, first_delay: float = 0.0) -> None:
        self._thread = threading.Thread(target=self._loop, args=(first_delay,), name="bench-peer", daemon=True)
        self._thread.start()

    def _loop(self, first_delay: float) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        nxt = time.monotonic() + first_delay
        while not self._stop.wait(max(0.0, nxt - time.monotonic())):
            nxt += self.interval
            try:
                c0 = sum(proc.cpu_times()[:2])
                t_start = self.clock()
                t0 = time.monotonic()
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=60) as r:
                    body = r.read().decode("utf-8", "replace")
                    status = r.status
                wall = time.monotonic() - t0
                c1 = sum(proc.cpu_times()[:2])
            except Exception as e:  # HTTP 500 included: the exporter failed the scrape
                self.failures += 1
                log.warning("peer scrape failed: %s", e)
                continue
            lines = [ln for ln in body.splitlines() if ln and not ln.startswith("#")]
            self.scrapes.append({
                "t": t_start, "status": status, "wall_s": wall, "cpu_s": c1 - c0,
                "series": len(lines), "pg_series": sum(1 for ln in lines if ln.startswith("pg_")),
            })

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=70)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
