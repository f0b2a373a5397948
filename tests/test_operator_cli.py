"""Operator-facing commands, run as real processes: piped output, `once` on empty metrics, `status`
without secrets, `reload` that never signals a stranger (issues 12 and 13)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reaper.catalog.metrics import Catalog
from reaper.daemon.status import STATUS_FILE, DaemonStatus, write_status_file

REAPER = [sys.executable, "-m", "reaper.cli"]
BOX_DRAWING = set("│─┃━┏┓┗┛┌┐└┘├┤┬┴┼╭╮╯╰")


def reaper(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """stdout is a pipe here, as in `reaper ... | grep`."""
    return subprocess.run([*REAPER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_piped_metrics_list_keeps_whole_names_one_line_each() -> None:
    proc = subprocess.run(f"{sys.executable} -m reaper.cli metrics list | grep reco_", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    catalog = Catalog.for_config()
    reco = sorted(n for n in catalog.metrics if n.startswith("reco_"))
    assert reco, "the catalogue has reco_ metrics"
    listed = [line.split("\t")[1] for line in proc.stdout.splitlines() if line.startswith("metric\t")]
    assert listed == reco
    assert not BOX_DRAWING & set(proc.stdout)


def test_metrics_list_plain_has_every_metric_and_preset_and_json_parses() -> None:
    catalog = Catalog.for_config()
    plain = reaper("metrics", "list")
    assert plain.returncode == 0, plain.stderr
    lines = [line.split("\t") for line in plain.stdout.splitlines()]
    assert {f[1] for f in lines if f[0] == "metric"} == set(catalog.metrics)
    assert {f[1] for f in lines if f[0] == "preset"} == set(catalog.presets)
    assert len(lines) == len(catalog.metrics) + len(catalog.presets)
    document = json.loads(reaper("metrics", "list", "--format", "json").stdout)
    assert [m["name"] for m in document["metrics"]] == sorted(catalog.metrics)
    assert {p["name"] for p in document["presets"]} == set(catalog.presets)
    table = reaper("metrics", "list", "--format", "table")
    assert f"{len(catalog.metrics)} metrics" in table.stdout


def test_metrics_show_plain_puts_the_sql_on_one_line_and_json_has_it_whole() -> None:
    catalog = Catalog.for_config()
    sql = catalog.metrics["bgwriter"].sql_for(15)
    assert sql is not None
    plain = reaper("metrics", "show", "bgwriter", "--pg-version", "15")
    assert plain.returncode == 0, plain.stderr
    sql_lines = [line.split("\t") for line in plain.stdout.splitlines() if line.startswith("sql\t")]
    assert len(sql_lines) == 1 and sql_lines[0][2] == sql.strip().replace("\n", "\\n")
    document = json.loads(reaper("metrics", "show", "bgwriter", "--pg-version", "15", "-f", "json").stdout)
    assert list(document["sql"].values()) == [sql.strip()]


def _status(pid: int, started_wall: float, config_path: str) -> DaemonStatus:
    return DaemonStatus(pid=pid, version="test", started_wall=started_wall, updated_wall=time.time(),
                        config_path=config_path, reloads=0, reload_failures=0, tasks=1, sources=(), sinks=())


def _secret_config(tmp_path: Path) -> Path:
    """A config whose source needs a secret that is not set: status and reload must not need it."""
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n\n'
                      '[[sources]]\nname = "main"\ndsn = "postgresql://u:${REAPER_TEST_UNSET_PW}@127.0.0.1:1/x"\n\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n')
    return config


def test_status_reads_the_state_dir_without_the_sources_secrets(tmp_path: Path) -> None:
    config = _secret_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "REAPER_TEST_UNSET_PW"}
    write_status_file(tmp_path / "state" / STATUS_FILE, _status(os.getpid(), time.time() - 60, str(config)))
    proc = subprocess.run([*REAPER, "status", "--config", str(config)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "REAPER_TEST_UNSET_PW" not in proc.stderr
    daemon = [line.split("\t") for line in proc.stdout.splitlines() if line.startswith("daemon\t")]
    assert daemon and daemon[0][1:3] == [str(os.getpid()), "running"]
    as_json = subprocess.run([*REAPER, "status", "--config", str(config), "--format", "json"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert json.loads(as_json.stdout)["pid"] == os.getpid()


@pytest.fixture
def sleeper() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def test_reload_refuses_a_stale_pidfile_whose_pid_is_not_reaper(tmp_path: Path, sleeper) -> None:
    config = _secret_config(tmp_path)
    pidfile = tmp_path / "stale.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    # even a status file naming that pid (the daemon that once had it) does not make it reaper
    write_status_file(tmp_path / "state" / STATUS_FILE, _status(sleeper.pid, time.time() - 3600, str(config)))
    proc = reaper("reload", "--pidfile", str(pidfile), "--config", str(config), "--wait", "1")
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not signalling" in proc.stderr and "reaper run" in proc.stderr
    assert sleeper.poll() is None  # reload has exited: had it signalled, the sleep would be dead


def test_reload_without_a_pidfile_takes_the_status_files_pid_only_once_verified(tmp_path: Path, sleeper) -> None:
    """`reaper reload --config FILE` (no --pidfile: a daemon started without one, as under systemd) said only
    "--pidfile is required". The status file's pid is now taken, with the same checks as a pidfile's."""
    config = _secret_config(tmp_path)
    proc = reaper("reload", "--config", str(config), "--wait", "1")
    assert proc.returncode == 1 and "no status file: is reaper running with this config?" in proc.stderr
    write_status_file(tmp_path / "state" / STATUS_FILE, _status(sleeper.pid, time.time() - 3600, str(config)))
    proc = reaper("reload", "--config", str(config), "--wait", "1")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"not signalling process {sleeper.pid}" in proc.stderr and "reaper run" in proc.stderr
    assert sleeper.poll() is None
    sleeper.kill()
    sleeper.wait(timeout=10)
    proc = reaper("reload", "--config", str(config), "--wait", "1")
    assert proc.returncode == 1 and f"its daemon (pid {sleeper.pid}) is not running" in proc.stderr, proc.stderr


def test_reload_refuses_a_reaper_looking_process_that_started_after_the_daemon(tmp_path: Path) -> None:
    """A pid reused by a process whose command line looks like `reaper run`: the status file's start
    time gives it away."""
    config = _secret_config(tmp_path)
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "reaper", "run"])
    try:
        pidfile = tmp_path / "reaper.pid"
        pidfile.write_text(str(impostor.pid))
        write_status_file(tmp_path / "state" / STATUS_FILE,
                          _status(impostor.pid, time.time() - 3600, str(config)))
        for pid_from in (["--pidfile", str(pidfile)], []):  # the status file's pid alike
            proc = reaper("reload", *pid_from, "--config", str(config), "--wait", "1")
            assert proc.returncode == 1
            assert "pid was reused" in proc.stderr, proc.stderr
            assert impostor.poll() is None
        (tmp_path / "state" / STATUS_FILE).unlink()  # and with no status file at all: refused too
        proc = reaper("reload", "--pidfile", str(pidfile), "--config", str(config), "--wait", "1")
        assert proc.returncode == 1 and "no status file" in proc.stderr
        assert impostor.poll() is None
    finally:
        impostor.kill()
        impostor.wait(timeout=10)


@pytest.mark.pg
def test_once_says_0_rows_for_a_metric_that_returned_none(pg15, fresh_db, tmp_path: Path) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n\n'
                      f'[[sources]]\nname = "main"\ndsn = "{pg15.dsn(dbname=fresh_db)}"\n')
    proc = reaper("once", "--config", str(config), "--metric", "sproc_stats", "--metric", "db_stats")
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert ["none", "main", "sproc_stats", "0 rows"] in lines  # a fresh database has no function calls
    assert any(f[:3] == ["row", "main", "db_stats"] for f in lines)
    table = reaper("once", "--config", str(config), "--metric", "sproc_stats", "--format", "table")
    assert "main / sproc_stats: 0 rows" in table.stdout
    as_json = json.loads(reaper("once", "--config", str(config), "-m", "sproc_stats", "-f", "json").stdout)
    assert as_json == [{"source": "main", "metric": "sproc_stats", "rows": [], "outcome": "0 rows"}]


def test_storage_init_help_says_how_to_keep_the_password_out_of_ps() -> None:
    text = " ".join(reaper("storage", "init", "--help").stdout.split())
    assert "${NAME}" in text and "--password-file" in text and "PGPASSWORD" in text and "ps" in text


def test_storage_init_warns_about_a_literal_password_but_not_about_an_environment_one(tmp_path: Path) -> None:
    with socket.socket() as s:  # bound, never listening: the connect is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        literal = reaper("storage", "init", "--dsn", f"postgresql://u:LEAKlit@127.0.0.1:{port}/db", timeout=90)
        from_env = reaper("storage", "init", "--dsn", "postgresql://u:${REAPER_TEST_PW}@127.0.0.1:" + f"{port}/db",
                          env={"REAPER_TEST_PW": "LEAKenv"}, timeout=90)
    assert literal.returncode == 1 and from_env.returncode == 1  # nothing listens there
    assert "warning: --dsn holds a password" in literal.stderr
    assert "warning" not in from_env.stderr
    assert "LEAK" not in literal.stderr + from_env.stderr + literal.stdout + from_env.stdout


@pytest.mark.parametrize(("mode", "ok"), [("0o600", True), ("0o640", True), ("0o755", False), ("0o200", False),
                                          ('"0640"', False)])
def test_jsonfile_file_mode_is_checked(tmp_path: Path, mode: str, ok: bool) -> None:
    config = tmp_path / "reaper.toml"
    config.write_text(f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "o.ndjson"}"\nfile_mode = {mode}\n')
    proc = reaper("check", "--config", str(config))
    assert (proc.returncode == 0) is ok, proc.stderr
    if not ok:
        assert proc.stderr.strip().splitlines() == [line for line in proc.stderr.strip().splitlines()
                                                    if line.startswith(f"{config}: sinks[0].file_mode: ")]


@pytest.mark.pg
def test_storage_init_takes_a_libpq_key_value_dsn(pg15, fresh_db) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(pg15.dsn(dbname=fresh_db))
    done = reaper("storage", "init", "--dsn", f"host={url.hostname} port={url.port} user={url.username} "
                  f"dbname={fresh_db}", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"storage postgresql://{url.username}@{url.hostname}:{url.port}/{fresh_db}: "
                                  "schema version "), done.stdout
