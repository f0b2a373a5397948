"""The command line, run as a real process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reaper.catalog.metrics import Catalog

REAPER = [sys.executable, "-m", "reaper.cli"]


def reaper(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REAPER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_check_reports_each_mistake_on_its_own_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("""
[[sources]]
name = "a"
dsn = "postgresql://u@127.0.0.1/app"
preset = "no_such_preset"

[[sources]]
name = "b"
dsn = "postgresql://u@127.0.0.1/app"
metrics = { locks = "sixty" }

[[sinks]]
type = "jsonfile"
pth = "out.ndjson"
""")
    proc = reaper("check", "--config", str(config))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4, proc.stderr  # the misspelled key is both unknown and leaves path missing
    assert f"{config}: sources[0].preset: unknown preset 'no_such_preset'" in lines[0] or any(
        line.startswith(f"{config}: sources[0].preset: unknown preset") for line in lines)
    assert any(line.startswith(f"{config}: sources[1].metrics.locks: expected a whole number") for line in lines)
    assert any(line.startswith(f"{config}: sinks[0].pth: unknown key; did you mean 'path'?") for line in lines)
    assert "Traceback" not in proc.stderr + proc.stdout


def test_check_three_mistakes_three_lines(tmp_path: Path) -> None:
    config = tmp_path / "three.toml"
    config.write_text("""
[[sources]]
name = "a"
dsn = "mysql://nope"

[[sources]]
name = "a"
dsn = "postgresql://u@h/app"
metrics = { no_such_metric = 60 }

[[sinks]]
type = "jsonfile"
path = "x.ndjson"
""")
    proc = reaper("check", "--config", str(config))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"{config}: sources[0].dsn: expected a postgresql:// URI or a libpq key=value string",
        f"{config}: sources[1].name: duplicate source name 'a' (also sources[0])",
        f"{config}: sources[1].metrics.no_such_metric: unknown metric",
    ]


def test_check_accepts_the_shipped_example_and_says_so_in_one_line() -> None:
    example = Path(__file__).parent.parent / "conf" / "reaper.toml"
    proc = reaper("check", "--config", str(example), env={"REPORTING_PASSWORD": "x"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [f"{example}: ok: 2 sources (1 enabled), 1 sinks, "
                                                f"1 own metrics, 1 own presets"]


def test_check_warns_when_the_pause_file_could_not_be_created(tmp_path: Path) -> None:
    """pause_file is the operator's emergency brake (`touch FILE`): a folder that is missing or is a file
    is worth a warning line on stderr (the config stays valid: the folder may be made at boot)."""
    base = '[[sources]]\nname = "a"\ndsn = "postgresql://u@h/db"\n[[sinks]]\ntype = "jsonfile"\npath = "-"\n'
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = {tmp_path / "missing" / "pause": f"its folder {tmp_path / 'missing'} does not exist",
             a_file / "pause": f"{a_file} is not a folder", tmp_path / "pause": None}
    for pause, why in cases.items():
        config = tmp_path / "c.toml"
        config.write_text(f'[collector]\npause_file = "{pause}"\n' + base)
        proc = reaper("check", "--config", str(config))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"{config}: ok: 1 sources"), proc.stdout
        if why is None:
            assert proc.stderr == ""
        else:
            lines = proc.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"{config}: collector.pause_file: warning: {pause}: ")
            assert why in lines[0], proc.stderr


def test_check_names_a_missing_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "env.toml"
    config.write_text('[[sources]]\nname = "a"\ndsn = "postgresql://u:${NOT_SET_ANYWHERE_X}@h/db"\n'
                      '[[sinks]]\ntype = "jsonfile"\npath = "-"\n')
    proc = reaper("check", "--config", str(config))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{config}: sources[0].dsn: environment variable NOT_SET_ANYWHERE_X is not set"


def test_check_reports_unreadable_toml_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[[sources]\nname = 1\n")
    proc = reaper("check", "--config", str(config))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"{config}: invalid TOML")
    missing = reaper("check", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and missing.stderr.strip() == f"{tmp_path / 'nope.toml'}: file not found"


@pytest.mark.parametrize("verb", ["run", "check", "once", "metrics", "demo"])
def test_every_verb_has_help(verb: str) -> None:
    proc = reaper(verb, "--help")
    assert proc.returncode == 0
    assert "usage: reaper" in proc.stdout and len(proc.stdout.splitlines()) > 4


def test_metrics_list_and_show() -> None:
    listing = reaper("metrics", "list", "--format", "table")
    assert listing.returncode == 0
    catalog = Catalog.for_config()
    for name in ("db_stats", "wal", "bgwriter", "checkpointer", "basic", "standard", "minimal"):
        assert name in listing.stdout
    assert f"{len(catalog.metrics)} metrics" in listing.stdout
    show = reaper("metrics", "show", "bgwriter", "--pg-version", "15")
    assert show.returncode == 0
    assert "pg_stat_bgwriter" in show.stdout
    unknown = reaper("metrics", "show", "no_such_metric")
    assert unknown.returncode == 1 and "unknown metric" in unknown.stderr
    too_old = reaper("metrics", "show", "db_stats", "--pg-version", "9", "--format", "plain")
    assert too_old.returncode == 1 and too_old.stderr.strip().startswith("db_stats: no SQL for PostgreSQL 9 (versions:")
    assert not any(line.startswith("sql\t") for line in too_old.stdout.splitlines())


def write_config(tmp_path: Path, dsn: str, out: Path, **source: str) -> Path:
    extra = "".join(f"{k} = {v}\n" for k, v in source.items())
    config = tmp_path / "reaper.toml"
    config.write_text(f'[collector]\nstate_dir = "{tmp_path / "state"}"\n\n'  # never the host's shared default
                      f'[[sources]]\nname = "main"\ndsn = "{dsn}"\n{extra}\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{out}"\n')
    return config


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.pg
def test_run_writes_every_basic_metric_on_the_first_tick_and_stops_cleanly(pg15, fresh_db, monitor_role,
                                                                           tmp_path: Path) -> None:
    role, password = monitor_role
    out = tmp_path / "out" / "m.ndjson"
    config = write_config(tmp_path, pg15.dsn(user=role, dbname=fresh_db, password=password), out,
                          preset='"basic"', tags='{ env = "test" }')
    proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        basic = set(Catalog.for_config().presets["basic"].metrics)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and {d["metric"] for d in read_lines(out)} < basic:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    docs = read_lines(out)
    assert {d["metric"] for d in docs} >= basic, stderr
    for doc in docs:
        assert doc["dbname"] == "main" and doc["custom_tags"] == {"env": "test"}
        assert doc["data"] and all("epoch_ns" in row for row in doc["data"])
    assert "stopped" in stderr
    assert password not in stderr + stdout


@pytest.mark.pg
def test_once_prints_rows_for_one_metric(pg15, fresh_db, tmp_path: Path) -> None:
    config = write_config(tmp_path, pg15.dsn(dbname=fresh_db), tmp_path / "unused.ndjson")
    proc = reaper("once", "--config", str(config), "--metric", "db_stats", "--format", "table")
    assert proc.returncode == 0, proc.stderr
    assert "main / db_stats (1 rows)" in proc.stdout
    assert "xact_commit" in proc.stdout


def test_once_with_an_unknown_metric_or_source_says_so_before_connecting(tmp_path: Path) -> None:
    config = write_config(tmp_path, "postgresql://nobody@127.0.0.1:1/x", tmp_path / "unused.ndjson")
    proc = reaper("once", "--config", str(config), "--metric", "no_such_metric", "--source", "nope")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["unknown source 'nope'", "unknown metric 'no_such_metric'"]


@pytest.mark.pg
def test_once_connects_with_a_libpq_key_value_dsn(pg15, fresh_db, tmp_path: Path) -> None:
    """A dsn in libpq's key=value form (as pgwatch's and psql's) connects like its URI."""
    from urllib.parse import urlsplit

    url = urlsplit(pg15.dsn(dbname=fresh_db))
    dsn = f"host={url.hostname} port={url.port} user={url.username} dbname='{fresh_db}' application_name=x"
    config = write_config(tmp_path, dsn, tmp_path / "unused.ndjson")
    proc = reaper("once", "--config", str(config), "--metric", "db_stats", "--format", "plain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("row\tmain\tdb_stats\t"), proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_collects_at_once_on_the_given_port_and_cleans_up(tmp_path: Path) -> None:
    port = _free_port()
    # where a daemon keeps its state by default: the demo must leave nothing there (it left a spill folder and
    # a status file in /var/lib/reaper or ~/.local/state/reaper at every run)
    homes = {"STATE_DIRECTORY": str(tmp_path / "systemd"), "XDG_STATE_HOME": str(tmp_path / "xdg"),
             "HOME": str(tmp_path / "home")}
    proc = reaper("demo", "--duration", "5", "--port", str(port), "--keep", timeout=180, env=homes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"127.0.0.1:{port}" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"kept (\S+measurements\.ndjson) and (\S+reaper\.log)", last)
    assert m, last
    kept = Path(m.group(1))
    try:
        assert kept.read_text().count("\n") > 0, "no measurement within the demo's first 5 s"
        assert not (kept.parent / "pg").exists(), "the server's files must go even with --keep"
        assert {p.name for p in kept.parent.iterdir()} == {"measurements.ndjson", "reaper.log"}
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)

    proc = reaper("demo", "--duration", "1", timeout=180, env=homes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"nothing kept \((\S+) removed", last)
    assert m, last
    assert not Path(m.group(1)).exists()
    assert not any(p.exists() for p in (tmp_path / "systemd", tmp_path / "xdg", tmp_path / "home")), (
        list(tmp_path.rglob("*")))
