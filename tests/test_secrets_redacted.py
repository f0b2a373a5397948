"""No password in any error text, for every source kind and every DSN position (issue 12 item 8).

libpq echoes an undecodable percent-encoded password (`invalid percent-encoded token: "..."`) and a
malformed URI whole; the redaction happens where errors are formatted (db.describe_error,
db.simple.describe_error) and, as a last net, in the log formatter. Proven from outside: real
`reaper once`, `reaper check` and `reaper run` processes against a closed port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from reaper.config.redact import dsn_secrets, redact_text

REAPER = [sys.executable, "-m", "reaper.cli"]
MARK = "LEAK"  # every password below contains it; nothing else does


def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connects are refused
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_dsns(port: int) -> dict[str, str]:
    return {
        "userinfo": f"postgresql://reaper:LEAKuser1@127.0.0.1:{port}/pgbouncer",
        "query": f"postgresql://reaper@127.0.0.1:{port}/pgbouncer?password=LEAKquery2",
        "badpct": f"postgresql://reaper:LEAKpct3%zz@127.0.0.1:{port}/pgbouncer",
        "pct": f"postgresql://reaper:LEAK%41pct4@127.0.0.1:{port}/pgbouncer",  # the server would get LEAKApct4
    }


def etcd_dsns(port: int) -> dict[str, str]:
    return {
        "userinfo": f"etcd://reaper:LEAKetcd5@127.0.0.1:{port}/service",
        "query": f"etcd://127.0.0.1:{port}/service?password=LEAKetcd6",
        "pct": f"etcd://reaper:LEAK%41etcd7@127.0.0.1:{port}/service",
    }


KINDS = ("postgres", "pgbouncer", "pgpool", "postgres-discovery", "patroni")


def write_config(tmp_path: Path, port: int, kinds: tuple[str, ...] = KINDS) -> tuple[Path, list[str]]:
    lines = [f'[collector]\nstate_dir = "{tmp_path / "state"}"\n',
             f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "out.ndjson"}"\n']
    names = []
    for kind in kinds:
        for position, dsn in (etcd_dsns(port) if kind == "patroni" else postgres_dsns(port)).items():
            names.append(f"{kind}-{position}")
            lines.append(f'[[sources]]\nname = "{names[-1]}"\nkind = "{kind}"\ndsn = "{dsn}"\n')
    config = tmp_path / "reaper.toml"
    config.write_text("\n".join(lines))
    return config, names


def test_the_reported_texts_are_redacted() -> None:
    assert redact_text('invalid percent-encoded token: "LEAKD4%zzpct"') == 'invalid percent-encoded token: "***"'
    uri = "postgresql://reaper:LEAK1@[::1:5432/db?sslmode=disable&password=LEAK2"
    text = redact_text(f'unterminated IPv6 host address in URI: "{uri}"')
    assert MARK not in text and "sslmode=disable" in text and "[::1:5432/db" in text
    secrets = dsn_secrets("postgresql://u:LEAK%41x@h/db")
    assert {"LEAK%41x", "LEAKAx"} <= secrets
    assert redact_text("missing \"=\" after \"LEAKAx\" in connection info string", secrets).count(MARK) == 0
    kv = dsn_secrets("host=h password='LEAK a b' user=u")
    assert "LEAK a b" in kv


def test_once_prints_no_password_for_any_kind_or_position(tmp_path: Path) -> None:
    config, names = write_config(tmp_path, closed_port())
    proc = subprocess.run([*REAPER, "once", "--config", str(config)], capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert MARK not in output, output
    assert "Traceback" not in output
    assert proc.returncode == 1  # every source is down
    for name in names:  # each one was tried and reported
        assert f"source {name}:" in proc.stderr, name
    assert 'invalid percent-encoded token: "***"' in proc.stderr  # the pooler kinds' libpq error, redacted
    assert "retrying" not in proc.stderr  # `once` tries each source once: its lines do not promise more


def test_check_rejects_a_malformed_uri_without_echoing_its_password(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[sources]]\nname = "a"\nkind = "pgbouncer"\n'
                      'dsn = "postgresql://reaper:LEAKv6@[::1:6432/pgbouncer?password=LEAKv6q"\n'
                      '[[sources]]\nname = "b"\nkind = "patroni"\ndsn = "etcd://reaper:LEAKetcdv6@[::1:2379/service"\n'
                      f'[[sinks]]\ntype = "jsonfile"\npath = "{tmp_path / "o.ndjson"}"\n')
    proc = subprocess.run([*REAPER, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "sources[0].dsn" in proc.stderr and "sources[1].dsn" in proc.stderr
    assert MARK not in proc.stdout + proc.stderr


def test_run_keeps_passwords_out_of_the_log_and_the_status_file(tmp_path: Path) -> None:
    config, names = write_config(tmp_path, closed_port())
    status_file = tmp_path / "state" / "status.json"
    direct = [n for n in names if not n.startswith(("postgres-discovery", "patroni"))]
    proc = subprocess.Popen([*REAPER, "run", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        seen: dict[str, str] = {}
        while time.monotonic() < deadline and set(seen) < set(direct):
            try:
                status = json.loads(status_file.read_text())
            except (OSError, ValueError):
                status = {"sources": []}
            seen = {s["name"]: s["last_error"] for s in status["sources"] if s["last_error"]}
            time.sleep(0.2)
        raw_status = status_file.read_text()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert set(seen) >= set(direct), (seen, stderr[-3000:])
    assert MARK not in raw_status
    assert MARK not in stdout + stderr, stderr
    assert proc.returncode == 0, stderr[-3000:]
    for name in names:
        if name not in direct:  # discovery and Patroni: their failures are logged by name
            assert f"source {name}:" in stderr, name
    assert oct(status_file.stat().st_mode & 0o777) == "0o600"
    assert os.stat(status_file.parent).st_mode & 0o077 == 0
