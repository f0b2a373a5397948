"""A host name whose DNS server never answers costs its source `connect_timeout_seconds`, not the resolver's time.

asyncpg looks a host name up with getaddrinfo in a worker thread, and trio-asyncio waited for that thread when
the connect's deadline cancelled it: the source's connect took the resolver's whole timeout and retries (here
2 x 5 s; with a dead DNS zone, every source of that zone), and said "Temporary failure in name resolution"
then. A real `reaper run`, in a mount namespace of its own where /etc/resolv.conf names a server that takes
every query and answers none (the host's file is not touched)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import wait_until


def _can_bind_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount --bind /etc/resolv.conf /etc/resolv.conf"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _can_bind_mount(), reason="needs root, unshare(1) and the right to mount: a "
                                "mount namespace with its own resolv.conf")


@pytest.fixture
def deaf_dns() -> Iterator[str]:
    """A DNS server (UDP port 53 on a loopback address of its own) that reads every query and answers none."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(20):
        address = f"127.0.{random.randint(1, 250)}.{random.randint(2, 250)}"
        try:
            sock.bind((address, 53))
            break
        except OSError:
            continue
    else:
        pytest.skip("no free loopback address for port 53")
    stop = threading.Event()
    sock.settimeout(0.2)

    def swallow() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                sock.recvfrom(4096)

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    yield address
    stop.set()
    thread.join(timeout=5)
    sock.close()


def test_a_name_whose_dns_never_answers_fails_the_connect_at_its_timeout(deaf_dns: str, tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {deaf_dns}\noptions timeout:5 attempts:2\n")  # 10 s and more a lookup
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n'
                      '[[sources]]\nname = "far"\ndsn = "postgresql://u@db.zone-with-a-dead-dns.internal:5432/db"\n'
                      'preset = "basic"\nconnect_timeout_seconds = 1\n')
    log = tmp_path / "reaper.log"
    inner = f"mount --bind {resolv} /etc/resolv.conf && exec {sys.executable} -m reaper.cli run --config {config}"
    with log.open("wb") as err:
        proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", inner], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: "source far: down:" in log.read_text() or proc.poll() is not None, limit=60,
                   what="the source's first failed connect")
        assert proc.poll() is None, log.read_text()
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    down = [line for line in log.read_text().splitlines() if "source far: down:" in line]
    assert "connect timed out after 1s" in down[0], down  # before: "Temporary failure in name resolution"
    assert "Traceback" not in log.read_text()
