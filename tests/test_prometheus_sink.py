"""The prometheus sink: exposition text, purging, self-metrics, the HTTP endpoint inside trio, and a real
Prometheus server (Debian's `prometheus` package) scraping a running daemon that collects a real PostgreSQL.
"""

from __future__ import annotations

import decimal
import gzip
import logging
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.load import load_config
from reaper.config.schema import PrometheusSinkConfig, SourceConfig
from reaper.daemon.app import Daemon
from reaper.daemon.sourcestate import LatenessHistogram
from reaper.daemon.status import DaemonStatus, SinkStatus, SourceStatus
from reaper.errors import ConfigError
from reaper.measurement import Measurement
from reaper.sinks import run_sink
from reaper.sinks.prometheus import PrometheusSink

CATALOG = Catalog.for_config()
EPOCH = 1_700_000_000_123_000_000
# promtool's naming-style findings that pgwatch's own column names (`_b`, `_s`, `_ms`, `_count`, `_total`
# on gauges, `summary` in a metric name) trigger; reaper keeps those names so pgwatch's dashboards work
PGWATCH_NAME_STYLE = ("metric names should not contain abbreviated units", 'should not have "_count" suffix',
                      'should not have "_total" suffix', "metric name should not include type",
                      "use base unit")


def measurement(metric: str = "db_stats", *rows: dict[str, Any], source: str = "main",
                tags: dict[str, str] | None = None, epoch_ns: int = EPOCH) -> Measurement:
    definition = CATALOG.metrics.get(metric)
    table = definition.table if definition is not None else metric
    return Measurement(source=source, metric=metric, table=table, epoch_ns=epoch_ns,
                       rows=tuple({"epoch_ns": epoch_ns, **row} for row in rows), tags=tags or {})


def families(sink: PrometheusSink) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(sink.exposition().decode())}


def samples(sink: PrometheusSink, prefix: str = "pgwatch_") -> dict[str, list[Sample]]:
    return {name: f.samples for name, f in families(sink).items() if name.startswith(prefix)}


def no_empty(labels: dict[str, str]) -> dict[str, str]:
    """Labels as Prometheus stores them: an empty value is an absent label."""
    return {k: v for k, v in labels.items() if v != ""}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sink_for(**kwargs: Any) -> PrometheusSink:
    options = {k: kwargs.pop(k) for k in ("namespace", "timestamps", "stale_after_seconds") if k in kwargs}
    return PrometheusSink(PrometheusSinkConfig(listen="127.0.0.1:0", **options), catalog=lambda: CATALOG,
                          **kwargs)


# -- exposition ------------------------------------------------------------------------------------------


async def test_names_labels_types_and_values_follow_pgwatch() -> None:
    sink = sink_for()
    await sink.write([
        measurement("db_stats", {"numbackends": 3, "xact_commit": decimal.Decimal("1234567"), "blk_read_time": 1.5,
                                 "tag_sys_id": "7301", "in_recovery_int": False, "checksum_last_failure_s": None,
                                 "datname_text": "app", "temp_bytes": decimal.Decimal("NaN"),
                                 "tup_fetched": 2**70, "tup_returned": decimal.Decimal("1e30")},
                    tags={"env": "prod", "team": "db"}),
        measurement("instance_up", {"instance_up": 1}, tags={"env": "prod", "team": "db"}),
    ])
    fams = families(sink)
    commit = fams["pgwatch_db_stats_xact_commit"]
    assert commit.type == "unknown"  # a cumulative counter, exposed untyped under pgwatch's name
    assert commit.documentation.startswith("db_stats.xact_commit (cumulative counter): ")
    [s] = commit.samples
    assert s.name == "pgwatch_db_stats_xact_commit"  # no `_total`: pgwatch's dashboards query this name
    assert list(s.labels) == ["dbname", "env", "sys_id", "team"]  # custom tags + tag_ columns, sorted
    assert s.labels == {"dbname": "main", "env": "prod", "sys_id": "7301", "team": "db"}
    assert s.value == 1234567.0 and s.timestamp is None  # no sample timestamps by default (pgwatch #749)
    assert fams["pgwatch_db_stats_numbackends"].type == "gauge"
    assert fams["pgwatch_db_stats_numbackends"].samples[0].value == 3.0
    assert fams["pgwatch_db_stats_blk_read_time"].samples[0].value == 1.5
    assert fams["pgwatch_db_stats_in_recovery_int"].samples[0].value == 0.0  # bool -> 0/1
    assert math.isnan(fams["pgwatch_db_stats_temp_bytes"].samples[0].value)
    assert fams["pgwatch_db_stats_tup_fetched"].samples[0].value == float(2**70)
    assert fams["pgwatch_db_stats_tup_returned"].samples[0].value == 1e30
    up = fams["pgwatch_instance_up"]
    assert up.type == "gauge" and [(x.labels["dbname"], x.value) for x in up.samples] == [("main", 1.0)]
    pgwatch = {name for name in fams if name.startswith("pgwatch_")}
    assert pgwatch == {"pgwatch_instance_up"} | {f"pgwatch_db_stats_{c}" for c in (
        "xact_commit", "numbackends", "blk_read_time", "in_recovery_int", "temp_bytes", "tup_fetched", "tup_returned")}
    # skipped: text (datname_text), null (checksum_last_failure_s), epoch_ns, tag_ columns


async def test_timestamps_namespace_and_name_sanitising() -> None:
    sink = sink_for(namespace="pg", timestamps=True)
    note = 'a "quoted" \\back\\slash\nand newline'
    await sink.write([measurement("my-metric", {"v-1": 2, "tag_the-db": "x"},
                                  tags={"9env": "a", "__x": "b", "note": note})])
    [s] = samples(sink, "pg_")["pg_my_metric_v_1"]
    assert s.timestamp is not None and float(s.timestamp) == pytest.approx(EPOCH / 1e9)  # milliseconds
    assert s.labels == {"_9env": "a", "_x": "b", "dbname": "main", "note": note, "the_db": "x"}
    assert families(sink)["pg_my_metric_v_1"].type == "gauge"  # unknown to the catalog: no counter claim


async def test_only_the_latest_measurement_per_source_and_metric_is_kept() -> None:
    sink = sink_for()
    await sink.write([measurement("db_stats", {"xact_commit": 1}, epoch_ns=EPOCH),
                      measurement("db_stats", {"xact_commit": 2}, epoch_ns=EPOCH + 10),
                      measurement("db_stats", {"xact_commit": 9}, source="other")])
    await sink.write([measurement("db_stats", {"xact_commit": 0}, epoch_ns=EPOCH - 1)])  # older: ignored
    got = {(s.labels["dbname"], s.value) for s in samples(sink)["pgwatch_db_stats_xact_commit"]}
    assert got == {("main", 2.0), ("other", 9.0)}
    assert len(sink.latest) == 2


async def test_a_metric_writing_several_tables_keeps_each() -> None:
    sink = sink_for()
    await sink.write([Measurement(source="main", metric="special", table=table, epoch_ns=EPOCH,
                                  rows=({"epoch_ns": EPOCH, "v": n},)) for n, table in enumerate(["one", "two"])])
    assert {name: [s.value for s in got] for name, got in samples(sink).items()} == {
        "pgwatch_one_v": [0.0], "pgwatch_two_v": [1.0]}


async def test_change_events_and_pooler_metrics_are_not_exported() -> None:
    sink = sink_for()
    await sink.write([measurement("change_events", {"n": 1}), measurement("pgbouncer_stats", {"n": 1}),
                      measurement("pgpool_stats", {"n": 1})])
    assert sink.latest == {} and samples(sink) == {}


async def test_duplicate_label_sets_are_dropped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    sink = sink_for()
    await sink.write([measurement("table_stats", {"tag_table_full_name": "t1", "seq_scan": 1},
                                  {"tag_table_full_name": "t1", "seq_scan": 2},
                                  {"tag_table_full_name": "t2", "seq_scan": 3})])
    with caplog.at_level(logging.WARNING, logger="reaper.sinks.prometheus"):
        for _ in range(3):
            got = [(s.labels["table_full_name"], s.value) for s in samples(sink)["pgwatch_table_stats_seq_scan"]]
            assert got == [("t1", 1.0), ("t2", 3.0)]
    warnings = [r.getMessage() for r in caplog.records if "label set already seen" in r.getMessage()]
    assert len(warnings) == 1 and "pgwatch_table_stats_seq_scan" in warnings[0]


async def test_stale_series_disappear_at_scrape() -> None:
    clock = FakeClock()
    sink = sink_for(stale_after_seconds=60, clock=clock)
    await sink.write([measurement("db_stats", {"xact_commit": 1}, source="old")])
    clock.now += 50
    await sink.write([measurement("db_stats", {"xact_commit": 2}, source="fresh")])
    clock.now += 20  # "old" was refreshed 70 s ago, "fresh" 20 s ago
    assert [s.labels["dbname"] for s in samples(sink)["pgwatch_db_stats_xact_commit"]] == ["fresh"]
    assert list(sink.latest) == [("fresh", "db_stats", "db_stats")]


async def test_a_long_interval_metric_stays_until_two_of_its_intervals_pass() -> None:
    clock = FakeClock()
    sources = [SourceConfig(name="main", dsn="postgresql://x/y", metrics={"db_stats": 3600})]
    sink = sink_for(stale_after_seconds=60, clock=clock, sources=lambda: sources)
    await sink.write([measurement("db_stats", {"xact_commit": 1})])
    clock.now += 3599
    assert "pgwatch_db_stats_xact_commit" in samples(sink)  # not collected again yet: still exposed
    clock.now += 3602
    assert samples(sink) == {}


async def test_a_source_that_went_down_keeps_only_instance_up_after_two_intervals() -> None:
    """Issue 13 item 7: an outage shorter than the default staleness still shows, series by series."""
    clock = FakeClock()
    sources = [SourceConfig(name="main", dsn="postgresql://x/y", metrics={"db_stats": 10, "instance_up": 10})]
    sink = sink_for(clock=clock, sources=lambda: sources)  # the default stale_after_seconds (15 min) is longer
    await sink.write([measurement("db_stats", {"xact_commit": 1}), measurement("instance_up", {"instance_up": 1})])
    for _ in range(3):  # the server is down: only instance_up = 0 arrives, every tick
        clock.now += 10
        await sink.write([measurement("instance_up", {"instance_up": 0})])
    left = samples(sink)
    assert set(left) == {"pgwatch_instance_up"} and [s.value for s in left["pgwatch_instance_up"]] == [0]


async def test_series_of_removed_sources_and_metrics_disappear() -> None:
    sources = [SourceConfig(name="a", dsn="postgresql://x/y", metrics={"db_stats": 60, "wal": 60}),
               SourceConfig(name="b", dsn="postgresql://x/y", metrics={"db_stats": 60})]
    sink = sink_for(sources=lambda: sources)
    await sink.write([measurement("db_stats", {"xact_commit": 1}, source="a"),
                      measurement("wal", {"xlog_location_b": 5}, source="a"),
                      measurement("db_stats", {"xact_commit": 2}, source="b")])
    assert set(samples(sink)) == {"pgwatch_db_stats_xact_commit", "pgwatch_wal_xlog_location_b"}
    sources[0] = SourceConfig(name="a", dsn="postgresql://x/y", metrics={"db_stats": 60, "wal": 0})  # disabled
    del sources[1]  # source removed
    got = samples(sink)
    assert set(got) == {"pgwatch_db_stats_xact_commit"}
    assert [s.labels["dbname"] for s in got["pgwatch_db_stats_xact_commit"]] == ["a"]
    assert set(sink.latest) == {("a", "db_stats", "db_stats")}
    sources[0] = SourceConfig(name="a", dsn="postgresql://x/y", enabled=False, metrics={"db_stats": 60})
    assert samples(sink) == {} and sink.latest == {}


def daemon_status() -> DaemonStatus:
    up = SourceStatus(name="main", status="up", ticks=7, measurements=20, rows=300, metric_errors=1,
                      degraded=("locks",), statements_last_tick=2, in_recovery=False, server_version="15.8",
                      last_error=None, last_tick_wall=1.0, next_tick_in=0.5, lateness_p50=0.001,
                      lateness_p99=0.02, lateness_max=0.03)
    down = SourceStatus(name="replica", status="down", ticks=3, measurements=3, rows=3, metric_errors=0,
                        degraded=(), statements_last_tick=0, in_recovery=None, server_version=None,
                        last_error="refused", last_tick_wall=None, next_tick_in=None, lateness_p50=0.0,
                        lateness_p99=0.0, lateness_max=0.0)
    sink = SinkStatus(label="pg", queued=4, sent=100, dropped=2, spilled=10, spill_bytes=4096)
    lateness = LatenessHistogram()
    for late in (0.0004, 0.001, 0.003, 0.003, 0.2, 30.0):
        lateness.observe(late)
    return DaemonStatus(pid=1, version="0.1.0", started_wall=1700000000.0, updated_wall=1700000100.0,
                        config_path="x.toml", reloads=3, reload_failures=1, tasks=12, sources=(up, down),
                        sinks=(sink,), tick_lateness=lateness.snapshot())


async def test_self_metrics_come_from_the_daemon_status() -> None:
    sink = sink_for(status=daemon_status)
    fams = families(sink)

    def values(name: str) -> dict[str, float]:
        return {"/".join(s.labels.values()) or "-": s.value for s in fams[name].samples
                if not s.name.endswith("_created")}

    assert values("reaper_source_up") == {"main": 1.0, "replica": 0.0}
    assert fams["reaper_source_ticks"].type == "counter"
    assert fams["reaper_source_ticks"].samples[0].name == "reaper_source_ticks_total"
    assert values("reaper_source_ticks") == {"main": 7.0, "replica": 3.0}
    assert values("reaper_source_measurements") == {"main": 20.0, "replica": 3.0}
    assert values("reaper_source_rows") == {"main": 300.0, "replica": 3.0}
    assert values("reaper_source_metric_errors") == {"main": 1.0, "replica": 0.0}
    assert values("reaper_source_degraded_metrics") == {"main": 1.0, "replica": 0.0}
    assert values("reaper_source_statements_last_tick") == {"main": 2.0, "replica": 0.0}
    assert values("reaper_source_tick_lateness_p50_seconds")["main"] == 0.001
    assert values("reaper_source_tick_lateness_p99_seconds")["main"] == 0.02
    assert values("reaper_sink_queue_depth") == {"pg": 4.0}
    assert values("reaper_sink_sent") == {"pg": 100.0}
    assert values("reaper_sink_spilled") == {"pg": 10.0}
    assert values("reaper_sink_dropped") == {"pg": 2.0}
    assert values("reaper_reloads") == {"-": 3.0}
    assert values("reaper_reload_failures") == {"-": 1.0}
    assert values("reaper_tasks") == {"-": 12.0}
    # every source's ticks in one histogram: cumulative buckets, a tick on a bound counted in that bucket
    histogram = fams["reaper_tick_lateness_seconds"]
    assert histogram.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert (buckets["0.001"], buckets["0.0025"], buckets["0.005"], buckets["0.1"], buckets["0.25"],
            buckets["10.0"], buckets["+Inf"]) == (2, 2, 4, 4, 5, 5, 6)
    totals = {s.name: s.value for s in histogram.samples if not s.name.endswith("_bucket")}
    assert totals["reaper_tick_lateness_seconds_count"] == 6
    assert totals["reaper_tick_lateness_seconds_sum"] == pytest.approx(30.2074)
    assert all(f.documentation for f in fams.values())
    assert not [name for name in fams if not name.startswith("reaper_")]


async def test_promtool_accepts_the_exposition(promtool: str) -> None:
    sink = sink_for(status=daemon_status)
    await sink.write([measurement("db_stats", {"numbackends": 3, "xact_commit": 5, "tag_sys_id": "1"},
                                  tags={"env": "prod"}),
                      measurement("db_stats", {"numbackends": 1, "xact_commit": 2}, source="b"),
                      measurement("instance_up", {"instance_up": 0}, source="b")])
    assert await check_metrics(promtool, sink.exposition()) == []


async def test_every_shipped_metric_parses_in_promtool(promtool: str) -> None:
    """All shipped columns at once: no parse error, and the only findings are pgwatch's own naming style."""
    rows = []
    for name, definition in CATALOG.metrics.items():
        columns = [c for c in definition.columns if c != "epoch_ns"] or [name]
        row = {c: (f"{name}-x" if c.startswith("tag_") else 1) for c in columns}
        rows.append(Measurement(source="main", metric=name, table=definition.table, epoch_ns=EPOCH,
                                rows=({"epoch_ns": EPOCH, **row},)))
    sink = sink_for(status=daemon_status)
    await sink.write(rows)
    findings = await check_metrics(promtool, sink.exposition())
    assert findings  # e.g. pgwatch_db_size_size_b: abbreviated unit
    assert all(name.startswith("pgwatch_") and any(k in text for k in PGWATCH_NAME_STYLE)
               for name, text in findings), findings


async def check_metrics(promtool: str, text: bytes) -> list[tuple[str, str]]:
    """promtool's lint findings as (metric, text); fails on anything that is not a lint finding."""
    with trio.fail_after(60):
        proc = await trio.run_process([promtool, "check", "metrics"], stdin=text, capture_stdout=True,
                                      capture_stderr=True, check=False)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode in (0, 3), out  # 1 = the text does not parse; 3 = lint findings
    return [tuple(line.split(" ", 1)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


# -- the HTTP endpoint -----------------------------------------------------------------------------------


def http_get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


async def listening(sink: PrometheusSink) -> list[str]:
    """The sink's URLs once its server listens (run_sink reports started before the sink opens)."""
    with trio.fail_after(10):
        while not sink.urls:
            await trio.sleep(0.01)
    return sink.urls


async def test_endpoint_serves_inside_the_trio_tree_and_stops_gracefully() -> None:
    sink = sink_for()
    send, receive = trio.open_memory_channel[Measurement](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_sink, sink, receive)  # as the daemon starts every sink
        [url] = await listening(sink)
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        await send.send(measurement("db_stats", {"xact_commit": 42}))
        await trio.testing.wait_all_tasks_blocked()
        openmetrics = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"}
        status, headers, body = await trio.to_thread.run_sync(http_get, url + "/metrics", openmetrics)
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b'pgwatch_db_stats_xact_commit{dbname="main"} 42\n' in body
        _, headers, zipped = await trio.to_thread.run_sync(http_get, url + "/any/path", {"Accept-Encoding": "gzip"})
        assert headers["content-encoding"] == "gzip"
        assert b'pgwatch_db_stats_xact_commit{dbname="main"} 42\n' in gzip.decompress(zipped)
        status, _, head = await trio.to_thread.run_sync(lambda: http_get(url, method="HEAD"))
        assert status == 200 and head == b""
        status, _, _ = await trio.to_thread.run_sync(lambda: http_get(url, method="POST"))
        assert status == 405

        timings = []
        for _ in range(50):
            started = time.perf_counter()
            await trio.to_thread.run_sync(http_get, url)
            timings.append(time.perf_counter() - started)
        timings.sort()
        logging.getLogger("test").info("scrape p50 %.2f ms, max %.2f ms", timings[25] * 1e3, timings[-1] * 1e3)
        assert timings[25] < 0.1

        started = trio.current_time()
        await send.aclose()  # the daemon's shutdown: the channel closes, run_sink drains and closes the sink
    assert trio.current_time() - started < 5
    with pytest.raises(OSError):
        await trio.to_thread.run_sync(http_get, url)


async def test_port_in_use_fails_at_open() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sink = PrometheusSink(PrometheusSinkConfig(listen=f"127.0.0.1:{port}"))
        with pytest.raises(ConfigError, match=f"cannot listen on '127.0.0.1:{port}': Address already in use"):
            await sink.open()
        await sink.aclose()


# -- a real Prometheus server scraping a real daemon --------------------------------------------------------


def install_prometheus() -> str | None:
    """Debian's prometheus package (prometheus + promtool): present, or installed with apt; else the reason."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Debian's `prometheus` package is not installed (apt-get install -y prometheus) and we cannot install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "`apt-get install -y prometheus` timed out"
    if proc.returncode != 0 or not (shutil.which("prometheus") and shutil.which("promtool")):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return f"`apt-get install -y prometheus` failed: {' '.join(tail)}"
    return None


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    reason = install_prometheus()
    if reason is not None:
        pytest.skip(reason)
    return shutil.which("prometheus") or "prometheus"


@pytest.fixture(scope="session")
def promtool(prometheus_bin: str) -> str:
    return shutil.which("promtool") or "promtool"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def start_prometheus(prometheus_bin: str, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """start(target "host:port") -> the server's base URL; scrapes the target every second."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: reaper\n    static_configs: [{{targets: ['{target}']}}]\n")
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        status, _, body = await trio.to_thread.run_sync(http_get, url)
    except OSError:  # not listening yet
        return []
    if status != 200:
        return []
    result: list[dict[str, Any]] = orjson.loads(body)["data"]["result"]
    return result


@pytest.mark.pg
async def test_real_prometheus_scrapes_the_daemon(pg15, fresh_db, monitor_role, tmp_path: Path,
                                                  start_prometheus: Callable[[str], str], promtool: str) -> None:
    user, password = monitor_role
    dsn = pg15.dsn(user=user, dbname=fresh_db, password=password)
    config_path = tmp_path / "reaper.toml"
    config_path.write_text(f"""
[collector]
state_dir = "{tmp_path / 'state'}"

[[sources]]
name = "main"
dsn = "{dsn}"
metrics = {{ instance_up = 1, db_stats = 1 }}
tags = {{ env = "test" }}

[[sinks]]
type = "prometheus"
listen = "127.0.0.1:0"
""")
    daemon = Daemon(load_config(config_path))
    async with db.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        [sink] = [running.sink for running in daemon.sinks.values()]
        assert isinstance(sink, PrometheusSink)
        [url] = await listening(sink)
        with trio.fail_after(30):
            while ("main", "db_stats", "db_stats") not in sink.latest:
                await trio.sleep(0.05)
        _, _, text = await trio.to_thread.run_sync(http_get, url + "/metrics")
        assert b'pgwatch_db_stats_xact_commit{dbname="main",env="test",sys_id="' in text
        assert b'reaper_source_up{source="main"} 1.0' in text
        assert b"reaper_tasks " in text
        assert all(name.startswith("pgwatch_") for name, _ in await check_metrics(promtool, text))

        base = start_prometheus(url.removeprefix("http://"))
        started = trio.current_time()
        with trio.fail_after(60):
            while not (found := await query(base, 'pgwatch_db_stats_xact_commit{dbname="main"}')):
                await trio.sleep(0.25)
        logging.getLogger("test").info("Prometheus had the series %.1fs after it started",
                                       trio.current_time() - started)
        [series] = found
        assert series["metric"]["env"] == "test" and float(series["value"][1]) >= 0
        [up] = await query(base, 'up{job="reaper"}')
        assert up["value"][1] == "1"
        [took] = await query(base, 'scrape_duration_seconds{job="reaper"}')
        logging.getLogger("test").info("Prometheus's last scrape took %.1f ms", float(took["value"][1]) * 1e3)
        assert [r["value"][1] for r in await query(base, 'pgwatch_instance_up{dbname="main"}')] == ["1"]
        assert await query(base, 'reaper_source_ticks_total{source="main"}')
        _, _, body = await trio.to_thread.run_sync(http_get, f"{base}/api/v1/metadata")
        types = {name: entries[0]["type"] for name, entries in orjson.loads(body)["data"].items()}
        assert types["pgwatch_db_stats_xact_commit"] == "unknown"  # untyped: a counter under pgwatch's name
        assert types["pgwatch_db_stats_numbackends"] == "gauge"
        assert types["reaper_source_ticks_total"] == "counter"

        stopping = trio.current_time()
        daemon.request_stop()
    stopped = trio.current_time() - stopping
    logging.getLogger("test").info("daemon stopped %.2fs after the request", stopped)
    assert stopped < 5  # Prometheus holds a keep-alive connection: the stop is still prompt
