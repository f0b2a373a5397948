"""The test-server provider choice (tests/containers/provider.py), against a fake Docker engine.

The fake engine is a unix socket served by a thread that answers the two requests the probe makes
(``/_ping`` and ``/images/<name>/json``) with the status codes a test sets. The container path
itself is exercised by the pg tests under ``REAPER_TEST_PG=docker`` (.ci/run); the last test here
checks, under that provider, that the session server really is a container.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from containers import provider
from containers.provider import Choice, choose_provider, image_for


class FakeEngine:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.ping = 200
        self.images: set[str] = set()
        self.requests: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen()
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                path = conn.recv(4096).split(b" ")[1].decode()
                self.requests.append(path)
                if path == "/_ping":
                    status = self.ping
                else:
                    status = 200 if path in {f"/images/{quote(i, safe='')}/json" for i in self.images} else 404
                conn.sendall(f"HTTP/1.0 {status} X\r\nContent-Length: 0\r\n\r\n".encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeEngine]:
    fake = FakeEngine(tmp_path / "docker.sock")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{fake.path}")
    for name in list(os.environ):
        if name.startswith(provider.IMAGE_ENV) or name == provider.PROVIDER_ENV:
            monkeypatch.delenv(name)
    yield fake
    fake.close()


def test_no_engine_means_local_with_the_reason_and_no_leaked_socket(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'nothing-here.sock'}")
    monkeypatch.delenv(provider.PROVIDER_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked socket would be a ResourceWarning
        choice = choose_provider()
    assert choice == Choice("local", "no Docker engine answers; REAPER_TEST_PG=docker to insist")
    assert choice.header().startswith("reaper test PostgreSQL: local (")


def test_a_socket_that_refuses_counts_as_no_engine(tmp_path, monkeypatch) -> None:
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()  # the file stays, nobody listens
    monkeypatch.setenv("DOCKER_HOST", f"unix://{dead}")
    monkeypatch.delenv(provider.PROVIDER_ENV, raising=False)
    assert choose_provider().name == "local"


def test_engine_without_the_image_means_local_and_says_how_to_build_it(engine: FakeEngine) -> None:
    choice = choose_provider()
    assert choice.name == "local"
    assert "reaper-test-pg:15 is not present" in choice.reason and "build-image.sh" in choice.reason
    assert engine.requests == ["/_ping", "/images/reaper-test-pg%3A15/json"]


def test_engine_with_the_image_means_docker(engine: FakeEngine) -> None:
    engine.images.add("reaper-test-pg:15")
    assert choose_provider() == Choice("docker", "a Docker engine answers and image reaper-test-pg:15 is present")


def test_an_engine_that_answers_ping_with_an_error_is_not_used(engine: FakeEngine) -> None:
    engine.ping = 500
    engine.images.add("reaper-test-pg:15")
    assert choose_provider().name == "local"


def test_the_environment_overrides_the_probe(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.images.add("reaper-test-pg:15")
    monkeypatch.setenv(provider.PROVIDER_ENV, "local")
    assert choose_provider() == Choice("local", "REAPER_TEST_PG=local")
    engine.images.clear()
    monkeypatch.setenv(provider.PROVIDER_ENV, "docker")
    assert choose_provider() == Choice("docker", "REAPER_TEST_PG=docker, image reaper-test-pg:15")
    engine.ping = 503
    with pytest.raises(pytest.UsageError, match="REAPER_TEST_PG=docker but no Docker engine answers"):
        choose_provider()
    monkeypatch.setenv(provider.PROVIDER_ENV, "podman")
    with pytest.raises(pytest.UsageError, match="must be 'local' or 'docker', got 'podman'"):
        choose_provider()


def test_image_per_major_wins_over_the_general_image(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    assert image_for(16) == "reaper-test-pg:16"
    monkeypatch.setenv("REAPER_TEST_PG_IMAGE", "postgres:17")
    assert image_for(15) == "postgres:17" and image_for(16) == "postgres:17"
    monkeypatch.setenv("REAPER_TEST_PG_IMAGE_16", "postgres:16.4")
    assert image_for(16) == "postgres:16.4" and image_for(15) == "postgres:17"
    engine.images.add("postgres:17")
    assert choose_provider() == Choice("docker", "a Docker engine answers and image postgres:17 is present")


@pytest.mark.pg
def test_the_session_server_comes_from_the_chosen_provider(pg_provider: Choice, pg15) -> None:
    if os.environ.get("REAPER_TEST_DSN"):
        pytest.skip("REAPER_TEST_DSN: an existing server, no provider")
    assert type(pg15).__name__ == ("DockerServer" if pg_provider.name == "docker" else "PgServer")
    assert pg15.psql("show shared_preload_libraries") == "pg_stat_statements"
    assert pg15.psql("select 1; select 2") == "1\n2"
    if pg_provider.name == "docker":
        # the data directory is shared with the host at the same path (in-process OS metrics read it)
        datadir = pg15.psql("show data_directory")
        assert (Path(datadir) / "PG_VERSION").read_text().strip() == str(pg15.major)
        with pytest.raises(pytest.skip.Exception, match="local servers only"):
            pg15.stop()
