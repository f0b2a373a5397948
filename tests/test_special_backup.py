"""backup_age_pgbackrest with Debian's pgBackRest on a real cluster, backup_age_walg with a WAL-G stand-in.

The pgBackRest fixture: a PostgreSQL 15 server archiving with `pgbackrest archive-push` into a local
repository (under the server's own run directory, which the server's OS user can write) with two
stanzas: `demo` (a full backup taken) and `broken` (created, but its backup fails: the server does not
archive for it, so pgBackRest gives up waiting for the WAL). WAL-G has no Debian package: its stand-in
(tests/data/walg-standin/wal-g) prints backup-list JSON shaped as WAL-G documents it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from fakes import count_spawns
from pgserver import PgServer, _as_server_user, _is_root, _server_user_ids

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.cli import main
from reaper.config.schema import SourceConfig, SpecialsConfig, StructureProblems, converter
from reaper.daemon.source import SourceReaper
from reaper.errors import MetricUnavailable
from reaper.measurement import Measurement
from reaper.special import SpecialContext, backup, special_spec
from reaper.special.registry import REGISTRY

CATALOG = Catalog.for_config()
STANDIN_DIR = Path(__file__).resolve().parent / "data" / "walg-standin"
Run = Callable[..., Any]

@attrs.frozen
class Repo:
    server: PgServer
    conf: Path  # stanzas demo and broken
    empty_conf: Path  # a repository without any stanza
    backup_started: float
    failed_backup: subprocess.CompletedProcess[str]


def _pgbackrest(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_as_server_user(["pgbackrest", f"--config={conf}", *args]), capture_output=True,
                          text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def repo() -> Iterator[Repo]:
    server = PgServer.create(settings={"archive_mode": "on", "archive_command": "/bin/true", "wal_level": "replica"})
    try:
        home = server.run_dir / "pgbackrest"
        home.mkdir()
        stanza = f"pg1-path={server.datadir}\npg1-port={server.port}\npg1-socket-path={server.socket_dir}\n"
        common = f"lock-path={home}/lock\nlog-path={home}/log\nlog-level-file=off\nlog-level-console=warn\n"
        conf = home / "pgbackrest.conf"
        conf.write_text(f"[global]\nrepo1-path={home}/repo\nrepo1-retention-full=2\nstart-fast=y\n{common}\n"
                        f"[demo]\n{stanza}\n[broken]\n{stanza}archive-timeout=2\n")
        empty_conf = home / "empty.conf"
        empty_conf.write_text(f"[global]\nrepo1-path={home}/empty-repo\n{common}")
        if _is_root():
            uid, gid = _server_user_ids()
            for path in (home, conf, empty_conf):
                os.chown(path, uid, gid)
        server.psql(f"alter system set archive_command = 'pgbackrest --config={conf} --stanza=demo archive-push %p';"
                    " select pg_reload_conf();")
        for name in ("demo", "broken"):
            done = _pgbackrest(conf, f"--stanza={name}", "stanza-create")
            assert done.returncode == 0, done.stderr
        started = time.time()
        done = _pgbackrest(conf, "--stanza=demo", "--type=full", "backup")
        assert done.returncode == 0, done.stderr
        failed = _pgbackrest(conf, "--stanza=broken", "--type=full", "backup")
        yield Repo(server, conf, empty_conf, started, failed)
    finally:
        server.cleanup()


@asynccontextmanager
async def special_runner(dsn: str, **specials: Any) -> AsyncIterator[Run]:
    """run(name) -> the handler's rows for one table; the handler's state is kept between runs."""
    config = SourceConfig(name="backup", dsn=dsn, specials=SpecialsConfig(**specials))
    states: dict[str, dict[str, Any]] = {}
    async with db.open_loop():
        conn = await db.open_source_connection(dsn, statement_timeout_seconds=30)
        try:
            async def run(name: str) -> list[dict[str, Any]]:
                spec = special_spec(name)
                assert spec is not None and spec.local_only
                ctx = SpecialContext(source=config, server=conn.server, conn=conn, metric=CATALOG.metrics[name],
                                     wall_ns=time.time_ns(), state=states.setdefault(name, {}))
                ((table, rows),) = await spec.handler(ctx)
                assert table == name
                assert [list(row) for row in rows] == [list(CATALOG.metrics[name].columns)] * len(rows)
                return rows

            yield run
        finally:
            await conn.close()


# -- pgBackRest on a real cluster ----------------------------------------------------------------


@pytest.mark.pg
async def test_pgbackrest_reports_the_age_of_the_backup_just_taken(repo: Repo) -> None:
    async with special_runner(repo.server.dsn(), pgbackrest_config=str(repo.conf), pgbackrest_stanza="demo") as run:
        (row,) = await run("backup_age_pgbackrest")
    assert row["retcode"] == 0, row
    assert 0 <= row["backup_age_seconds"] <= time.time() - repo.backup_started + 1, row
    assert row["message"].startswith("OK. stanza demo: newest backup ") and "(full)" in row["message"]


@pytest.mark.pg
async def test_a_working_pgbackrest_runs_every_time(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    spawns = count_spawns(monkeypatch)
    async with special_runner(repo.server.dsn(), pgbackrest_config=str(repo.conf), pgbackrest_stanza="demo") as run:
        rows = [await run("backup_age_pgbackrest") for _ in range(3)]
    assert len(spawns) == 3
    assert all(row["retcode"] == 0 for (row,) in rows)


@pytest.mark.pg
async def test_pgbackrest_reports_a_failed_backup(repo: Repo) -> None:
    assert repo.failed_backup.returncode != 0, repo.failed_backup.stdout  # the backup of `broken` did fail
    async with special_runner(repo.server.dsn(), pgbackrest_config=str(repo.conf),
                              pgbackrest_stanza="broken") as run:
        (row,) = await run("backup_age_pgbackrest")
    assert row["retcode"] == 2 and row["backup_age_seconds"] is None, row
    assert row["message"] == "Not OK. stanza broken: no valid backups (code 2); no backup"


@pytest.mark.pg
async def test_pgbackrest_with_several_stanzas_and_none_configured_names_them(repo: Repo) -> None:
    async with special_runner(repo.server.dsn(), pgbackrest_config=str(repo.conf)) as run:
        with pytest.raises(MetricUnavailable) as caught:
            await run("backup_age_pgbackrest")
    assert "lists 2 stanzas (broken, demo)" in caught.value.message
    assert "specials.pgbackrest_stanza" in caught.value.message


@pytest.mark.pg
async def test_pgbackrest_without_a_stanza_says_why_once(repo: Repo, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    handler = backup.backup_age_pgbackrest

    async def counted(ctx: SpecialContext) -> Any:
        nonlocal calls
        calls += 1
        return await handler(ctx)

    monkeypatch.setattr(backup, "backup_age_pgbackrest", counted)
    spawns = count_spawns(monkeypatch)
    config = SourceConfig(name="nostanza", dsn=repo.server.dsn(), metrics={"backup_age_pgbackrest": 1},
                          specials=SpecialsConfig(pgbackrest_config=str(repo.empty_conf)))
    got: list[Measurement] = []
    reaper = SourceReaper(config, CATALOG, got.append)
    caplog.set_level(logging.INFO)
    async with db.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        with trio.fail_after(30):
            while calls < 3:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if "backup_age_pgbackrest" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "pgbackrest info lists no stanza" in lines[0] and "specials.pgbackrest_stanza" in lines[0]
    assert not [m for m in got if m.metric == "backup_age_pgbackrest"]
    assert "backup_age_pgbackrest" not in reaper.state.degraded  # unavailable, not failing
    assert len(spawns) == 1  # the verdict is kept (tools.VERDICT_SECONDS): pgbackrest is not asked every run


@pytest.mark.pg
async def test_a_missing_pgbackrest_names_its_package(repo: Repo, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    async with special_runner(repo.server.dsn(), pgbackrest_stanza="demo") as run:
        with pytest.raises(MetricUnavailable) as caught:
            await run("backup_age_pgbackrest")
    assert caught.value.message == "pgbackrest is not installed or not on reaper's PATH (Debian package pgbackrest)"


# -- WAL-G through its stand-in --------------------------------------------------------------------


@pytest.mark.pg
async def test_walg_standin_gives_the_newest_backup_and_gets_the_configured_environment(
        repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{STANDIN_DIR}{os.pathsep}{os.environ['PATH']}")
    finished = time.time() - 42
    monkeypatch.setenv("STANDIN_NEWEST_FINISH", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(finished))
                       + f".{int(finished % 1 * 1e9):09d}Z")
    monkeypatch.setenv("STANDIN_RECORD", str(tmp_path / "record"))
    env_file = tmp_path / "walg.env"
    env_file.write_text("# WAL-G storage\nexport WALG_FILE_PREFIX='/backups/db1'\nWALG_COMPRESSION_METHOD=brotli\n")
    async with special_runner(repo.server.dsn(), walg_env_file=str(env_file), walg_config="/etc/wal-g.json",
                              walg_env={"WALG_COMPRESSION_METHOD": "lz4"}) as run:
        (row,) = await run("backup_age_walg")
    assert row["retcode"] == 0, row
    assert 41 <= row["backup_age_seconds"] <= 44, row
    assert row["message"].startswith("OK. newest backup base_000000010000000000000009_D_000000010000000000000004 ")
    record = (tmp_path / "record").read_text().splitlines()
    assert record == ["args: backup-list --json --detail --config /etc/wal-g.json",
                      "WALG_COMPRESSION_METHOD=lz4", "WALG_FILE_PREFIX=/backups/db1"]


@pytest.mark.pg
async def test_walg_failure_is_a_row_with_its_exit_code(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{STANDIN_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_EXIT", "1")
    async with special_runner(repo.server.dsn()) as run:
        (row,) = await run("backup_age_walg")
    assert row["retcode"] == 1 and row["backup_age_seconds"] is None
    assert row["message"].startswith("Not OK. wal-g backup-list failed (exit 1): ERROR: ")
    assert "AccessDenied" in row["message"]


@pytest.mark.pg
async def test_a_missing_walg_and_an_unreadable_env_file_are_unavailable(repo: Repo, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    async with special_runner(repo.server.dsn()) as run:
        with pytest.raises(MetricUnavailable) as missing:
            await run("backup_age_walg")
        assert missing.value.message == ("wal-g is not installed or not on reaper's PATH (WAL-G has no Debian "
                                         "package: install its release binary)")
    async with special_runner(repo.server.dsn(), walg_env_file=str(tmp_path / "absent.env")) as run:
        with pytest.raises(MetricUnavailable, match=r"cannot read specials\.walg_env_file .*absent\.env"):
            await run("backup_age_walg")


async def test_a_command_prefix_runs_the_tool_without_the_host_check(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With specials.command_prefix the operator says where the tool runs: no database question is asked."""
    monkeypatch.setenv("PATH", f"{STANDIN_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_RECORD", str(tmp_path / "record"))
    config = SourceConfig(name="remote", dsn="postgresql://nowhere.invalid/db",
                          specials=SpecialsConfig(command_prefix="env WALG_FROM_PREFIX=1"))
    ctx = SpecialContext(source=config, server=None, conn=None, metric=CATALOG.metrics["backup_age_walg"],  # type: ignore[arg-type]
                         wall_ns=1, state={})
    ((_, (row,)),) = await backup.backup_age_walg(ctx)
    assert row["retcode"] == 0 and row["backup_age_seconds"] > 0
    assert "WALG_FROM_PREFIX=1" in (tmp_path / "record").read_text()


# -- parsing ---------------------------------------------------------------------------------------


def test_pgbackrest_row_takes_the_newest_backup_without_errors() -> None:
    stanza = {"name": "main", "status": {"code": 0, "message": "ok", "lock": {"backup": {"held": True}}},
              "backup": [{"label": "A", "type": "full", "timestamp": {"start": 100, "stop": 200}},
                         {"label": "B", "type": "diff", "timestamp": {"start": 300, "stop": 400}},
                         {"label": "C", "type": "incr", "error": True, "timestamp": {"start": 500, "stop": 600}}]}
    row = backup.pgbackrest_row(stanza, now=1000.4, wall_ns=7)
    assert row == {"epoch_ns": 7, "retcode": 0, "backup_age_seconds": 600,
                   "message": "OK. stanza main: newest backup B (diff) finished 600 s ago; a backup is running"}


def test_walg_row_and_its_times() -> None:
    assert backup.parse_walg_time("2026-03-02T04:10:52.183417021Z").timestamp() == pytest.approx(1772424652.183417)
    assert backup.parse_walg_time("2026-03-02T06:10:52+02:00").timestamp() == 1772424652
    with pytest.raises(ValueError):
        backup.parse_walg_time("yesterday")
    listed = [{"backup_name": "old", "time": "2026-03-02T04:00:00Z"},
              {"backup_name": "new", "finish_time": "2026-03-02T04:10:00Z", "time": "1999-01-01T00:00:00Z"}]
    row = backup.walg_row(listed, now=1772424600 + 60, wall_ns=1)
    assert (row["retcode"], row["backup_age_seconds"]) == (0, 60)
    assert backup.walg_row([], now=0, wall_ns=1)["message"] == "Not OK. wal-g lists no backup"


def test_env_file_lines() -> None:
    assert backup.parse_env_file("# comment\n\nexport A=1\nC=\"two words\"\nD='q'\nE=\n") == {
        "A": "1", "C": "two words", "D": "q", "E": ""}
    with pytest.raises(ValueError, match="line 2 is not KEY=VALUE"):
        backup.parse_env_file("A=1\nnot a pair\n")


# -- configuration and the catalogue ---------------------------------------------------------------


def test_the_specials_table_is_checked_one_line_per_problem() -> None:
    raw = {"name": "a", "dsn": "postgresql://h/db", "specials": {
        "command_prefx": "sudo", "pgbackrest_stanza": 3, "walg_env": {"WALG_X": 1}}}
    with pytest.raises(StructureProblems) as caught:
        converter.structure(raw, SourceConfig)
    assert sorted(caught.value.lines) == [
        "specials.command_prefx: unknown key; did you mean 'command_prefix'? (valid keys: command_prefix, "
        "pgbackrest_config, pgbackrest_stanza, walg_config, walg_env, walg_env_file)",
        "specials.pgbackrest_stanza: expected a string, got 3",
        "specials.walg_env.WALG_X: expected a string, got 1"]
    with pytest.raises(StructureProblems, match=r"specials\.command_prefix: cannot be split into words"):
        converter.structure({**raw, "specials": {"command_prefix": "sudo -u 'postgres"}}, SourceConfig)
    ok = converter.structure({**raw, "specials": {"command_prefix": "sudo -n -u postgres"}}, SourceConfig)
    assert ok.specials.command_prefix == "sudo -n -u postgres"


def test_metrics_list_shows_every_special_metric_with_a_collector(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", "list"]) == 0
    special = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()
               if line.startswith("metric\t") and line.split("\t")[2] == "special"]
    assert {"backup_age_pgbackrest", "backup_age_walg", "smart_health_per_disk"} <= set(special)
    assert [name for name in special if not REGISTRY[name].collected] == []
