"""Sources from a pgwatch config database (`[[sources_from]]`) and the health endpoints, from outside:
a config database made by `reaper config-db init` on PostgreSQL 15, rows edited with psql while a
real `reaper run` reads it, /liveness, /readiness and /status asked with httpx (issue 17 items 1, 3)."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pgserver import quote_ident
from test_daemon import REAPER, Daemon, max_gap, reaper_connections, wait_until

pytestmark = pytest.mark.pg
REFRESH = 2  # refresh_seconds in these tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dbs(pg15) -> Iterator[list[str]]:
    """A config database (first) and three monitored databases."""
    tag = uuid.uuid4().hex[:8]
    names = [f"t_cfg_{tag}", *(f"t_from_{i}_{tag}" for i in range(3))]
    for n in names:
        pg15.psql(f"create database {quote_ident(n)}")
    yield names
    for n in names:
        pg15.psql(f"drop database if exists {quote_ident(n)} with (force)")


def listen_at(d: Daemon, port: int) -> None:
    text = d.config.read_text()
    d.config.write_text(text.replace("[collector]\n", f'[collector]\nhttp_listen = "127.0.0.1:{port}"\n'))


def init_config_db(pg15, cfg: str) -> None:
    done = subprocess.run([*REAPER, "config-db", "init", "--dsn", pg15.dsn(dbname=cfg)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "created the pgwatch config schema" in done.stdout
    again = subprocess.run([*REAPER, "config-db", "init", "--dsn", pg15.dsn(dbname=cfg)], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "exists already" in again.stdout


def add_source(pg15, cfg: str, name: str, dbname: str, config: str = '{"ping": 1}') -> None:
    pg15.psql(f"insert into pgwatch.source (name, connstr, preset_config, config, custom_tags) values "
              f"('{name}', '{pg15.dsn(dbname=dbname)}', null, '{config}', '{{\"site\": \"{name}\"}}')", dbname=cfg)


def test_a_real_run_follows_pgwatch_source_rows_and_answers_health(pg15, dbs, tmp_path: Path) -> None:
    cfg, a, b, c = dbs
    init_config_db(pg15, cfg)
    # pgwatch's own schema: every column, defaults as pgwatch's
    columns = pg15.psql("select string_agg(column_name, ',' order by column_name) from information_schema.columns "
                        "where table_schema = 'pgwatch' and table_name = 'source'", dbname=cfg)
    assert set(columns.split(",")) == {
        "name", "connstr", "is_superuser", "preset_config", "config", "is_enabled", "last_modified_on", "dbtype",
        "include_pattern", "exclude_pattern", "custom_tags", "group", "host_config", "only_if_master",
        "preset_config_standby", "config_standby"}
    assert "basic" in pg15.psql("select string_agg(name, ',') from pgwatch.preset", dbname=cfg).split(",")
    add_source(pg15, cfg, "src_a", a)
    add_source(pg15, cfg, "src_b", b)
    port = free_port()
    d = Daemon(tmp_path)
    d.write_config([], extra=f'\n[[sources_from]]\ndsn = "{pg15.dsn(dbname=cfg)}"\nrefresh_seconds = {REFRESH}\n')
    listen_at(d, port)
    fast = '\n[presets.fast]\ndescription = "ping and kpi"\nmetrics = { ping = 1, kpi = 1 }\n'
    d.config.write_text(d.config.read_text() + fast)
    base = f"http://127.0.0.1:{port}"
    try:
        d.start()
        wait_until(lambda: {"src_a", "src_b"} <= {x["dbname"] for x in d.lines()}, what="both rows collected")
        assert any(x["dbname"] == "src_a" and x["custom_tags"] == {"site": "src_a"} for x in d.lines())

        # health: a real HTTP client
        assert httpx.get(f"{base}/liveness", timeout=5).status_code == 200
        wait_until(lambda: httpx.get(f"{base}/readiness", timeout=5).status_code == 200, what="ready")
        status = httpx.get(f"{base}/status", timeout=5)
        assert status.status_code == 200 and status.headers["content-type"] == "application/json"
        assert {s["name"] for s in status.json()["sources"]} == {"src_a", "src_b"}
        assert httpx.get(f"{base}/nothing", timeout=5).status_code == 404

        # add a row: collected within one refresh (plus a tick)
        added = time.time()
        add_source(pg15, cfg, "src_c", c)
        wait_until(lambda: "src_c" in {x["dbname"] for x in d.lines()}, limit=REFRESH + 3, what="the added row")
        assert time.time() - added < REFRESH + 3
        # change a preset: src_b now has 'fast' (ping and kpi) on its same connection, in place
        pid_b = pg15.psql(f"select pid from pg_stat_activity where application_name = 'reaper' and datname = '{b}'")
        pg15.psql("insert into pgwatch.preset (name, description, metrics) values "
                  "('fast', 'ping and kpi', '{\"ping\": 1, \"kpi\": 1}');"
                  "update pgwatch.source set config = null, preset_config = 'fast' where name = 'src_b'", dbname=cfg)
        wait_until(lambda: any(x["dbname"] == "src_b" and x["metric"] == "kpi" for x in d.lines()),
                   limit=REFRESH + 3, what="the new preset's metric")
        assert pg15.psql(f"select pid from pg_stat_activity where application_name = 'reaper' "
                         f"and datname = '{b}'") == pid_b
        # remove one row and disable another: their connections close within one refresh
        pg15.psql("delete from pgwatch.source where name = 'src_a'", dbname=cfg)
        pg15.psql("update pgwatch.source set is_enabled = false where name = 'src_b'", dbname=cfg)
        wait_until(lambda: reaper_connections(pg15, a) == 0 and reaper_connections(pg15, b) == 0,
                   limit=REFRESH + 3, what="removed and disabled rows stopped")
        # the unchanged source (src_c) missed no tick through all of it
        stop_edits = time.time()
        wait_until(lambda: time.time() - stop_edits > 1.5, what="a little more data")
        assert max_gap(d.times("src_c")) < 2.0

        # the config database refuses connections: the last list is kept, said once; then it works again
        pg15.psql(f"alter database {quote_ident(cfg)} allow_connections false")
        wait_until(lambda: "cannot read the sources" in d.log_text(), limit=REFRESH + 10, what="the failure line")
        seen = len(d.times("src_c"))
        wait_until(lambda: len(d.times("src_c")) > seen + 3 * REFRESH, limit=30, what="three more refreshes")
        assert d.log_text().count("cannot read the sources") == 1
        assert reaper_connections(pg15, c) == 1  # still collected
        pg15.psql(f"alter database {quote_ident(cfg)} allow_connections true")
        wait_until(lambda: "sources read again" in d.log_text(), limit=REFRESH + 10, what="the recovery line")
        assert "cannot read the sources" in d.log_text() and d.log_text().count("sources read again") == 1
        assert d.stop() == 0
    finally:
        pg15.psql(f"alter database {quote_ident(cfg)} allow_connections true")
        d.kill()


def test_readiness_is_503_with_the_reason_while_a_sink_cannot_open(pg15, dbs, tmp_path: Path) -> None:
    _, a, _, _ = dbs
    port = free_port()
    d = Daemon(tmp_path)
    d.write_config([("src_a", pg15.dsn(dbname=a), 1)],
                   extra='\n[[sinks]]\ntype = "postgres"\ndsn = "postgresql://nobody@127.0.0.1:1/none"\n')
    listen_at(d, port)
    try:
        d.start()
        wait_until(lambda: d.times("src_a"), what="collection")
        answer = httpx.get(f"http://127.0.0.1:{port}/readiness", timeout=5)
        assert answer.status_code == 503
        assert "sink postgres:postgresql://nobody@127.0.0.1:1/none" in answer.text and "not writing" in answer.text
        assert httpx.get(f"http://127.0.0.1:{port}/liveness", timeout=5).status_code == 200
        assert httpx.post(f"http://127.0.0.1:{port}/status", timeout=5).status_code == 405
    finally:
        d.kill()


def test_import_from_db_writes_toml_that_check_accepts_and_reports_unknown_kinds(pg15, dbs, tmp_path: Path) -> None:
    cfg, a, b, _ = dbs
    init_config_db(pg15, cfg)
    pg15.psql(f"""
        insert into pgwatch.source (name, connstr, dbtype, preset_config, preset_config_standby, custom_tags,
                                    "group", only_if_master, is_enabled, include_pattern, exclude_pattern)
        values ('disc', '{pg15.dsn(dbname=a)}', 'postgres-continuous-discovery', 'standard', 'standby',
                '{{"dc": "x"}}', 'g1', true, false, '^t_', 'tmp');
        insert into pgwatch.source (name, connstr, preset_config, config) values
            ('plain', 'host=127.0.0.1 port={pg15.dsn(dbname=b).rsplit(":", 1)[1].split("/")[0]} dbname={b}',
             null, '{{"db_stats": 30, "wal": 0}}');
        -- a kind of a newer pgwatch that reaper does not collect: reported, not dropped silently
        alter table pgwatch.source drop constraint source_dbtype_check;
        insert into pgwatch.source (name, connstr, dbtype)
            values ('prom', 'http://127.0.0.1:9100/metrics', 'prometheus');
        """, dbname=cfg)
    out = tmp_path / "from-db.toml"
    done = subprocess.run([*REAPER, "import-pgwatch", "sources", "--from-db", pg15.dsn(dbname=cfg), "-o", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "'prometheus'" in done.stderr and "prom" in done.stderr  # one line for the unknown kind
    text = out.read_text()
    assert 'kind = "postgres-discovery"' in text and 'standby_preset = "standby"' in text
    assert 'only_if_primary = true' in text and 'enabled = false' in text and 'group = "g1"' in text
    assert 'metrics = { wal = 0, db_stats = 30 }' in text and 'include_pattern = "^t_"' in text  # jsonb's order
    assert 'exclude_pattern = "tmp"' in text and 'tags = { dc = "x" }' in text and 'preset = "standard"' in text
    assert "only_if_primary = false" not in text  # pgwatch's default is left out
    assert "# [[sources]]" in text and '# kind = "prometheus"' in text  # commented out, not lost
    checked = subprocess.run([*REAPER, "check", "--config", str(out)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "2 sources (1 enabled)" in checked.stdout
