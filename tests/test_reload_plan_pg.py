"""`reaper reload --plan` against a real `reaper run` with 2 sources on PostgreSQL 15: for each kind of
change it prints the right plan and changes nothing (the daemon's status and its backends in
pg_stat_activity are identical before and after); then `reaper reload` applies a change and prints
the plan it carried out, the same lines --plan showed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pgserver import quote_ident
from test_daemon import PING, REAPER, Daemon, wait_until

pytestmark = pytest.mark.pg


def write_config(daemon: Daemon, sources: list[dict[str, Any]], sink_extra: str = "") -> None:
    text = [f'[collector]\nstate_dir = "{daemon.state}"\nshutdown_grace_seconds = 10\n',
            f'[[sinks]]\ntype = "jsonfile"\npath = "{daemon.out}"\n{sink_extra}',
            f'[metrics.ping]\ndescription = "ping"\ngauges = ["*"]\n[metrics.ping.sql]\n14 = "{PING}"\n']
    for s in sources:
        metrics = ", ".join(f"{m} = {i}" for m, i in s.get("metrics", {"ping": 1}).items())
        tags = ", ".join(f'{k} = "{v}"' for k, v in s.get("tags", {}).items())
        text.append(f'[[sources]]\nname = "{s["name"]}"\ndsn = "{s["dsn"]}"\nmetrics = {{ {metrics} }}\n'
                    f'tags = {{ {tags} }}\nconnect_timeout_seconds = 2\n')
    daemon.config.write_text("\n".join(text))


def plan(daemon: Daemon, fmt: str = "json") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REAPER, "reload", "--plan", "--config", str(daemon.config), "--format", fmt],
                          capture_output=True, text=True, timeout=60)


def backends(pg15: Any) -> str:
    """reaper's sessions on the server: database, pid and start time (a reconnect changes them)."""
    return pg15.psql("select datname, pid, backend_start from pg_stat_activity where application_name = 'reaper' "
                     "order by 1, 2")


def snapshot(daemon: Daemon) -> tuple[Any, ...]:
    st = daemon.fresh_status()
    sources = [(s.name, s.status, [(lane.name, lane.connected) for lane in s.lanes]) for s in st.sources]
    return st.reloads, st.reload_failures, sources, [k.label for k in st.sinks], st.running


@pytest.fixture
def two_dbs(pg15: Any) -> Iterator[list[str]]:
    names = [f"t_plan_{i}_{os.getpid()}_{time.monotonic_ns() % 10**6}" for i in range(3)]
    for n in names:
        pg15.psql(f"create database {quote_ident(n)}")
    yield names
    for n in names:
        pg15.psql(f"drop database if exists {quote_ident(n)} with (force)")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    d.kill()


def test_reload_plan_previews_every_kind_of_change_and_reload_prints_what_it_did(pg15: Any, two_dbs: list[str],
                                                                                 daemon: Daemon) -> None:
    a_db, b_db, c_db = two_dbs
    a = {"name": "a", "dsn": pg15.dsn(dbname=a_db)}
    b = {"name": "b", "dsn": pg15.dsn(dbname=b_db)}
    write_config(daemon, [a, b])
    daemon.start()
    wait_until(lambda: all(len(daemon.times(s)) >= 2 for s in "ab"), what="two sources collecting")
    wait_until(lambda: len(backends(pg15).splitlines()) == 2, what="one backend per source")
    before, sessions = snapshot(daemon), backends(pg15)

    def sources_of(document: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
        return {p["name"]: (p["action"], p["reasons"]) for p in document["plan"]["sources"]}

    # add
    write_config(daemon, [a, b, {"name": "c", "dsn": pg15.dsn(dbname=c_db)}])
    doc = json.loads(plan(daemon).stdout)
    assert sources_of(doc) == {"a": ("unchanged", []), "b": ("unchanged", []), "c": ("added", [])}
    # remove
    write_config(daemon, [a])
    doc = json.loads(plan(daemon).stdout)
    assert sources_of(doc) == {"a": ("unchanged", []), "b": ("removed", [])}
    # DSN change: a restart that names the dsn
    write_config(daemon, [a, {**b, "dsn": b["dsn"].replace("@127.0.0.1:", "@localhost:")}])
    doc = json.loads(plan(daemon).stdout)
    assert sources_of(doc) == {"a": ("unchanged", []), "b": ("restarted", ["dsn"])}
    # interval change: updated in place, with the metric and both intervals
    write_config(daemon, [{**a, "metrics": {"ping": 2}}, b])
    doc = json.loads(plan(daemon).stdout)
    assert sources_of(doc) == {"a": ("updated", []), "b": ("unchanged", [])}
    assert doc["plan"]["sources"][0]["intervals"] == [{"key": "ping", "old": "1s", "new": "2s"}]
    # tag change
    write_config(daemon, [a, {**b, "tags": {"env": "staging"}}])
    doc = json.loads(plan(daemon).stdout)
    assert sources_of(doc)["b"] == ("updated", [])
    assert doc["plan"]["sources"][1]["settings"] == [{"key": "tags.env", "old": None, "new": "staging"}]
    # sink change: rebuilt, naming the key
    write_config(daemon, [a, b], sink_extra="max_bytes = 10000000\n")
    doc = json.loads(plan(daemon).stdout)
    assert [(k["action"], [c["key"] for c in k["settings"]]) for k in doc["plan"]["sinks"]] == [
        ("rebuilt", ["max_bytes"])]
    assert all(p["action"] == "unchanged" for p in doc["plan"]["sources"])
    # invalid config: refused, one line per problem, exit 1
    write_config(daemon, [a, {**b, "metrics": {"no_such": 1}}])
    answer = plan(daemon)
    doc = json.loads(answer.stdout)
    assert answer.returncode == 1 and doc["refused"] is True
    assert [line for line in doc["plan"]["errors"] if "no_such" in line], doc
    # nothing changed: same status (no reload counted, same sources, lanes and running state), same backends
    assert snapshot(daemon) == before
    assert backends(pg15) == sessions
    assert "reload:" not in daemon.log_text()

    # now apply the interval change: `reaper reload` prints the plan it carried out, as --plan showed it
    write_config(daemon, [{**a, "metrics": {"ping": 2}}, b])
    preview = [line for line in plan(daemon, "plain").stdout.splitlines()[1:] if "\tunchanged\t" not in line]
    assert preview == ["source\ta\tupdated\tmetrics.ping 1 -> 2; interval ping 1s -> 2s"]
    answer = daemon.reload()
    assert answer.returncode == 0, answer.stderr
    lines = answer.stdout.splitlines()
    assert lines[0].startswith("reload applied (pid ") and "1 updated, 1 unchanged" in lines[0]
    assert lines[1].startswith("plan\treload of ") and lines[2:] == preview
    assert backends(pg15) == sessions  # updated in place: no reconnect
    st = daemon.fresh_status()
    assert st.reloads == 1 and st.last_reload is not None and st.last_reload.applied
    assert "reload: source a: updated: metrics.ping 1 -> 2; interval ping 1s -> 2s" in daemon.log_text()

    # a refused reload prints the daemon's own refusal lines
    write_config(daemon, [a, {**b, "metrics": {"no_such": 1}}])
    answer = daemon.reload()
    assert answer.returncode == 1 and "reload rejected" in answer.stderr
    assert [line for line in answer.stderr.splitlines() if "no_such" in line], answer.stderr
    assert daemon.stop() == 0
