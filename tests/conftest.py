"""Shared fixtures.

``pg15``      session-wide PostgreSQL 15, pg_stat_statements created in ``postgres``, from the provider
              tests/containers/provider.py chooses (``REAPER_TEST_PG=local|docker``; the pytest header
              says which and why): local binaries (tests/pgserver.py) or a Docker container
              (``stop()``/``start()`` then skip the test); or, with ``REAPER_TEST_DSN=postgresql://...``
              set, a handle on that existing server (its user must be a superuser; ``stop()``/``start()``
              then skip the test).
``pg_provider`` the session's provider choice (``.name`` is "local" or "docker", ``.reason``).
``fresh_db``  a new, uniquely named database on ``pg15`` for one test (dropped afterwards), by name.
``aio_loop``  a trio-asyncio loop for the test: ``await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)``.

tests/ has no ``__init__.py`` on purpose: pytest puts this directory on sys.path, so ``import fakes`` works.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest
import trio_asyncio
from containers.provider import Choice, choose_provider, open_server
from pgserver import (
    PgServerError,
    ServerHandle,
    cleanup_stale,
    create_extensions,
    quote_ident,
)
from silent_server import SilentServer

EXTERNAL_DSN_ENV = "REAPER_TEST_DSN"


@pytest.fixture(scope="session", autouse=True)
def state_dirs_under_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A daemon started without [collector] state_dir keeps its state where a daemon would (/var/lib/reaper as
    root, ~/.local/state/reaper else): tests that do so (and the processes they start) write under the test
    run's temp folder instead, never into the machine's or the user's folders."""
    base = tmp_path_factory.mktemp("default-state")
    os.environ["STATE_DIRECTORY"] = str(base / "systemd")
    os.environ["XDG_STATE_HOME"] = str(base / "xdg")


class ExternalServer:
    """The PgServer interface (``dsn``/``psql``/``major``) for a server we did not start.

    ``user=None`` means the DSN's own user (and its password); ``stop``/``start`` skip the test.
    """

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"{EXTERNAL_DSN_ENV} must be a postgresql:// URI, got {dsn!r}")
        self._parts = parts
        self._user = unquote(parts.username or "postgres")
        self._password = unquote(parts.password) if parts.password is not None else None
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 5432
        self._major: int | None = None

    @property
    def major(self) -> int:
        if self._major is None:
            self._major = int(self.psql("show server_version_num")) // 10000
        return self._major

    def dsn(self, user: str | None = None, dbname: str = "postgres", password: str | None = None) -> str:
        if user is None or user == self._user:
            user = self._user
            if password is None:
                password = self._password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        netloc = auth + "@" + self._parts.netloc.rpartition("@")[2]
        return urlunsplit((self._parts.scheme, netloc, "/" + quote(dbname, safe=""), self._parts.query, ""))

    def psql(self, sql: str, dbname: str = "postgres", user: str | None = None, *, timeout: float = 120) -> str:
        exe = shutil.which("psql")
        if exe is None:
            raise PgServerError(f"{EXTERNAL_DSN_ENV} is set but there is no psql on PATH")
        cmd = [exe, "-X", "-v", "ON_ERROR_STOP=1", "-At", "-q", "-d", self.dsn(user=user, dbname=dbname), "-f", "-"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = "10"
        try:
            proc = subprocess.run(cmd, input=sql, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            raise PgServerError(f"psql timed out after {timeout} s") from e
        if proc.returncode != 0:
            raise PgServerError(f"psql failed (exit {proc.returncode})\n--- stderr ---\n{proc.stderr.strip()}")
        return proc.stdout.removesuffix("\n")

    def stop(self, mode: str = "fast") -> NoReturn:
        pytest.skip("needs a server started by the tests")

    def start(self) -> NoReturn:
        pytest.skip("needs a server started by the tests")

    def is_running(self) -> bool:
        return True

    def cleanup(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ExternalServer {self.host}:{self.port}>"


_provider_choice: Choice | None = None


def _choice() -> Choice:
    global _provider_choice
    if _provider_choice is None:
        _provider_choice = choose_provider()
    return _provider_choice


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get(EXTERNAL_DSN_ENV):
        return f"reaper test PostgreSQL: external ({EXTERNAL_DSN_ENV} is set)"
    return _choice().header()


@pytest.fixture(scope="session")
def pg_provider() -> Choice:
    return _choice()


@pytest.fixture(scope="session")
def pg15(pg_provider: Choice) -> Iterator[ServerHandle]:
    external = os.environ.get(EXTERNAL_DSN_ENV)
    if external:
        external_server = ExternalServer(external)
        create_extensions(external_server, "postgres", ["pg_stat_statements"])
        yield external_server
        return
    cleanup_stale()  # leftovers of killed runs
    with open_server(pg_provider, major=15) as server:
        create_extensions(server, "postgres", ["pg_stat_statements"])
        yield server


@pytest.fixture
def fresh_db(pg15: ServerHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    pg15.psql(f"CREATE DATABASE {quote_ident(name)}")
    yield name
    # WITH (FORCE): connections the test leaked must not keep the database alive
    pg15.psql(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")


@pytest.fixture
def monitor_role(pg15: ServerHandle, fresh_db: str) -> Iterator[tuple[str, str]]:
    """A login role with only pg_monitor and CONNECT on ``fresh_db``: (name, password)."""
    name = f"mon_{uuid.uuid4().hex[:8]}"
    password = f"pw-{uuid.uuid4().hex}"
    pg15.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pg_monitor;"
              f" GRANT CONNECT ON DATABASE {quote_ident(fresh_db)} TO {name}")
    yield name, password
    pg15.psql(f"DROP OWNED BY {name} CASCADE; DROP ROLE {name}", dbname=fresh_db)


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    """A server that accepts connections and never answers (tests/silent_server.py)."""
    server = SilentServer()
    yield server
    server.close()
