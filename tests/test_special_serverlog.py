"""server_log_event_counts: csvlog parsing, localised severities, and real servers in local and remote mode."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from pgserver import PgServer, PgServerError, create_monitoring_role

from reaper import db
from reaper.catalog.metrics import Catalog
from reaper.config.schema import MetricDef, SourceConfig
from reaper.daemon.source import SourceReaper
from reaper.errors import MetricError, MetricUnavailable
from reaper.measurement import Measurement
from reaper.special import SpecialContext, facts
from reaper.special import serverlog as sl

# -- parsing (no server) ----------------------------------------------------------------------------


def record(severity: str, message: str, database: str = "app", user: str = "alice") -> str:
    quoted = '"' + message.replace('"', '""') + '"'
    return (f'2024-05-01 12:34:56.789 CET,"{user}","{database}",4242,"[local]",66321f00.1092,1,"SELECT",'
            f'2024-05-01 12:34:50 CET,3/7,0,{severity},XX000,{quoted},,,,,,"select 1",,,"psql","client backend",,0\n')


GERMAN_AND_FRENCH = "".join([
    record("FEHLER", "Division durch Null"),
    record("FEHLER", 'Syntaxfehler bei "selec",\nZeile 2, "noch", eine'),
    record("WARNUNG", "Achtung, Achtung"),
    record("HINWEIS", "nur ein Hinweis", database="other"),
    record("LOG", "Prüfpunkt beginnt", database="", user=""),
    record("FATAL", 'Rolle "x" existiert nicht'),
    record("PANIK", "es brennt", database="", user=""),
    record("ERREUR", "division par zéro"),
    record("ATTENTION", "attention, \"guillemets\"\net retour à la ligne"),
    record("ERREUR", "relation « t » n'existe pas", database="other"),
    record("INFO", "information"),
    record("DEBUG", "débogage"),
    record("NOTICE", "avis"),
])
EXPECTED_APP = {"ERROR": 3, "WARNING": 2, "NOTICE": 1, "FATAL": 1, "INFO": 1, "DEBUG": 1}
EXPECTED_TOTAL = {"ERROR": 4, "WARNING": 2, "NOTICE": 2, "FATAL": 1, "INFO": 1, "DEBUG": 1, "LOG": 1, "PANIC": 1}


def test_severity_words_map_to_english() -> None:
    cases = {"FEHLER": "ERROR", "WARNUNG": "WARNING", "HINWEIS": "NOTICE", "PANIK": "PANIC", "ERREUR": "ERROR",
             "ATTENTION": "WARNING", "PANIQUE": "PANIC", "ERRORE": "ERROR", "ОШИБКА": "ERROR", "ADVERTENCIA": "WARNING",
             "error": "ERROR", " LOG ": "LOG", "DEBUG2": "DEBUG", "STATEMENT": None, "": None}
    for word, english in cases.items():
        assert sl.english_severity(word) == english, word
    for lang in ("de", "fr"):
        assert set(sl.LOCALISED_SEVERITIES[lang].values()) == set(sl.SEVERITIES)


def severity_counts(counts: sl.Counts) -> tuple[dict[str, int], dict[str, int]]:
    return ({k: v for k, v in counts.database.items() if v}, {k: v for k, v in counts.total.items() if v})


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 100000])
def test_german_and_french_csvlog_in_any_chunking(chunk: int) -> None:
    data = GERMAN_AND_FRENCH.encode()
    cursor = sl.Cursor()
    counts = sl.Counts()
    for i in range(0, len(data), chunk):
        cursor.consume(data[i:i + chunk], "app", counts)
    assert cursor.offset == len(data)
    assert severity_counts(counts) == (EXPECTED_APP, EXPECTED_TOTAL)
    assert counts.unknown == 0
    assert not cursor.splitter.buf  # nothing pending: the data ended with a complete record


def test_entering_at_a_record_boundary_in_tiny_chunks_loses_nothing() -> None:
    data = GERMAN_AND_FRENCH.encode()
    cursor = sl.Cursor(offset=0, splitter=sl.RecordSplitter(synced=False))  # a baseline at the end of a record
    counts = sl.Counts()
    for i in range(0, len(data), 3):
        cursor.consume(data[i:i + 3], "app", counts)
    assert severity_counts(counts) == (EXPECTED_APP, EXPECTED_TOTAL)


def test_an_incomplete_record_waits_for_the_rest() -> None:
    data = GERMAN_AND_FRENCH.encode()
    cut = data.index(b"Zeile 2")  # inside a quoted message that holds a newline
    cursor = sl.Cursor()
    counts = sl.Counts()
    cursor.consume(data[:cut], "app", counts)
    assert counts.total["ERROR"] == 1  # the second FEHLER is not complete yet
    cursor.consume(data[cut:], "app", counts)
    assert severity_counts(counts) == (EXPECTED_APP, EXPECTED_TOTAL)


@pytest.mark.parametrize("chunk", [1, 5, 19, 20, 100000])
def test_entering_mid_record_skips_to_the_next_record(chunk: int) -> None:
    data = GERMAN_AND_FRENCH.encode()
    start = data.index(b"Zeile 2")  # a baseline offset inside a record
    cursor = sl.Cursor(offset=start, splitter=sl.RecordSplitter(synced=False))
    counts = sl.Counts()
    for i in range(start, len(data), chunk):
        cursor.consume(data[i:i + chunk], "app", counts)
    assert counts.total["ERROR"] == 2 and counts.total["WARNING"] == 2  # the cut FEHLER is skipped, not miscounted
    assert sum(counts.total.values()) == sum(EXPECTED_TOTAL.values()) - 2


def test_a_huge_record_is_counted_from_its_head() -> None:
    huge = record("ERROR", "x" * (3 * sl.RECORD_HEAD_BYTES) + '"quoted"\n' * 1000) + record("WARNING", "after")
    cursor = sl.Cursor()
    counts = sl.Counts()
    data = huge.encode()
    for i in range(0, len(data), 4096):
        cursor.consume(data[i:i + 4096], "app", counts)
    assert severity_counts(counts) == ({"ERROR": 1, "WARNING": 1}, {"ERROR": 1, "WARNING": 1})
    assert len(cursor.splitter.buf) == 0


# -- the handler over a directory (no server) ---------------------------------------------------------


@attrs.frozen
class FakeServer:
    database: str = "app"
    system_identifier: str | None = "1"
    address: str = "fake:1"
    major: int = 15


class SettingsOnly:
    """A connection that answers only the server facts query (local mode needs nothing else)."""

    def __init__(self, data_directory: str, **overrides: Any) -> None:
        self.server = FakeServer()
        self.settings = {"via_socket": True, "logging_collector": "on", "log_destination": "stderr,csvlog",
                         "log_directory": "log", "data_directory": data_directory, "role": "mon",
                         "can_read_binary": False, "can_read_text": False, "tablespaces": "[]", **overrides}
        self.statements = 0

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        assert sql == facts.FACTS_SQL
        self.statements += 1
        return [dict(self.settings)]


def fake_ctx(conn: Any, state: dict[str, Any]) -> SpecialContext:
    metric = MetricDef(name=sl.NAME, description="", special=True)
    return SpecialContext(source=SourceConfig(name="s", dsn="postgresql://x@h/db"), server=FakeServer(), conn=conn,
                          metric=metric, wall_ns=time.time_ns(), state=state)


def counted(result: Any) -> tuple[dict[str, int], dict[str, int]]:
    ((table, (row,)),) = result
    assert table == sl.NAME
    assert list(row) == ["epoch_ns", *sl.COLUMNS]
    return ({s: row[s.lower()] for s in sl.SEVERITIES if row[s.lower()]},
            {s: row[f"{s.lower()}_total"] for s in sl.SEVERITIES if row[f"{s.lower()}_total"]})


async def test_rotation_truncation_and_rewrites_never_count_twice(tmp_path: Path) -> None:
    logdir = tmp_path / "log"
    logdir.mkdir()
    state: dict[str, Any] = {"force_mode": "local"}
    conn = SettingsOnly(str(tmp_path))
    ctx = fake_ctx(conn, state)
    first = logdir / "postgresql-1.csv"
    first.write_text(record("ERROR", "before the baseline"))
    (logdir / "postgresql-1.log").write_text("not csv\n")
    assert await sl.server_log_event_counts(ctx) == []  # baseline
    assert state["mode"] == "local"
    assert counted(await sl.server_log_event_counts(ctx)) == ({}, {})
    with first.open("a") as f:
        f.write(record("ERROR", "one") + record("WARNING", "two", database="other"))
        f.write(record("FATAL", "three, incomplete")[:50])
    assert counted(await sl.server_log_event_counts(ctx)) == ({"ERROR": 1}, {"ERROR": 1, "WARNING": 1})
    with first.open("a") as f:  # the rest of the record, then a rotation
        f.write(record("FATAL", "three, incomplete")[50:])
    os.utime(first, (time.time() - 5, time.time() - 5))
    second = logdir / "postgresql-2.csv"
    second.write_text(record("PANIC", "four") + record("LOG", "five", database=""))
    assert counted(await sl.server_log_event_counts(ctx)) == ({"FATAL": 1, "PANIC": 1}, {"FATAL": 1, "PANIC": 1,
                                                                                           "LOG": 1})
    assert counted(await sl.server_log_event_counts(ctx)) == ({}, {})
    # log_truncate_on_rotation reusing a name: shorter than before -> read again from the start
    first.write_text(record("NOTICE", "six"))
    os.utime(first, (time.time() + 5, time.time() + 5))
    assert counted(await sl.server_log_event_counts(ctx)) == ({"NOTICE": 1}, {"NOTICE": 1})
    # rewritten under the same name and longer than before: the beginning differs
    second.unlink()
    second.write_text(record("INFO", "seven", user="bob") * 3)
    os.utime(second, (time.time() + 10, time.time() + 10))
    assert counted(await sl.server_log_event_counts(ctx)) == ({"INFO": 3}, {"INFO": 3})
    assert counted(await sl.server_log_event_counts(ctx)) == ({}, {})
    assert conn.statements == 1  # the settings: read once on this connection


async def test_a_record_cut_by_a_crash_is_counted_once_its_file_is_long_finished(tmp_path: Path) -> None:
    logdir = tmp_path / "log"
    logdir.mkdir()
    ctx = fake_ctx(SettingsOnly(str(tmp_path)), {"force_mode": "local"})
    old = logdir / "a.csv"
    old.write_text("")
    assert await sl.server_log_event_counts(ctx) == []
    cut = record("PANIC", "cut short")
    old.write_text(record("ERROR", "complete") + cut[:cut.index("cut short")])
    assert counted(await sl.server_log_event_counts(ctx)) == ({"ERROR": 1}, {"ERROR": 1})
    os.utime(old, (time.time() - 120, time.time() - 120))
    (logdir / "b.csv").write_text(record("LOG", "after the restart", database=""))
    assert counted(await sl.server_log_event_counts(ctx)) == ({"PANIC": 1}, {"PANIC": 1, "LOG": 1})
    assert counted(await sl.server_log_event_counts(ctx)) == ({}, {})


async def test_reads_are_bounded_and_the_rest_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sl, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(sl, "MAX_BYTES_PER_RUN", 5000)
    logdir = tmp_path / "log"
    logdir.mkdir()
    (logdir / "a.csv").write_text("")
    ctx = fake_ctx(SettingsOnly(str(tmp_path)), {"force_mode": "local"})
    assert await sl.server_log_event_counts(ctx) == []
    one = record("ERROR", "e")
    (logdir / "a.csv").write_text(one * 100)
    seen = 0
    runs = 0
    while seen < 100:
        db_counts, _ = counted(await sl.server_log_event_counts(ctx))
        seen += db_counts.get("ERROR", 0)
        runs += 1
    assert seen == 100 and runs >= len(one) * 100 // 5000


async def test_missing_csvlog_or_collector_is_one_clear_warning(tmp_path: Path) -> None:
    """The server's setup, not a failure: unavailable (one warning, skipped; not a degraded metric retried as
    an ERROR at every start of every source of a `full` fleet)."""
    ctx = fake_ctx(SettingsOnly(str(tmp_path), logging_collector="off", log_destination="stderr"), {})
    with pytest.raises(MetricUnavailable) as err:
        await sl.server_log_event_counts(ctx)
    assert "logging_collector = on (it is off)" in err.value.message
    assert "csvlog in log_destination (it is 'stderr')" in err.value.message


# -- real servers -----------------------------------------------------------------------------------

LOG_DB = "logtest"


@pytest.fixture(scope="module")
def log_server() -> Iterator[PgServer]:
    settings = {"logging_collector": "on", "log_destination": "csvlog", "lc_messages": "C"}
    with PgServer.create(major=15, settings=settings) as server:
        server.psql(f"create database {LOG_DB}")
        yield server


def monitoring_dsn(server: PgServer, *grants: str) -> str:
    name = f"mon_{uuid.uuid4().hex[:8]}"
    dsn = create_monitoring_role(server, name, password="pw")
    server.psql(f"grant connect on database {LOG_DB} to {name}")
    for grant in grants:  # functions belong to a database: the grant is made in the monitored one
        server.psql(f"grant execute on function {grant} to {name}", dbname=LOG_DB)
    return dsn.rsplit("/", 1)[0] + "/" + LOG_DB


def log_text(server: PgServer) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((server.datadir / "log").glob("*.csv")))


def make_events(server: PgServer) -> str:
    """2 errors, 1 warning (plus the marker's), 1 fatal in LOG_DB; returns the marker to wait for."""
    for sql in ("select 1/0", "selec 1"):
        with pytest.raises(PgServerError):
            server.psql(sql, dbname=LOG_DB)
    server.psql("do $$ begin raise warning 'careful, \"quoted\"\nand a second line'; end $$", dbname=LOG_DB)
    with pytest.raises(PgServerError):
        server.psql("select 1", dbname=LOG_DB, user="no_such_role")
    marker = f"marker-{uuid.uuid4().hex}"
    server.psql(f"do $$ begin raise warning '{marker}'; end $$", dbname=LOG_DB)
    return marker


async def wait_for_log(server: PgServer, marker: str) -> None:
    with trio.fail_after(20):
        while marker not in log_text(server):
            await trio.sleep(0.05)


EVENTS = {"ERROR": 2, "WARNING": 2, "FATAL": 1}


@asynccontextmanager
async def log_runner(dsn: str, state: dict[str, Any]) -> AsyncIterator[Callable[[], Any]]:
    metric = Catalog.for_config().metrics[sl.NAME]
    async with db.open_loop():
        conn = await db.open_source_connection(dsn, statement_timeout_seconds=30)
        try:
            async def run() -> Any:
                ctx = SpecialContext(source=SourceConfig(name="logs", dsn=dsn), server=conn.server, conn=conn,
                                     metric=metric, wall_ns=time.time_ns(), state=state)
                return await sl.server_log_event_counts(ctx)

            yield run
        finally:
            await conn.close()


def only_events(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k in ("ERROR", "WARNING", "FATAL", "PANIC")}


async def scenario(server: PgServer, dsn: str, state: dict[str, Any]) -> None:
    """Baseline, events, a run without news, events around a log rotation: each line counted once."""
    async with log_runner(dsn, state) as run:
        server.psql("do $$ begin raise warning 'before the baseline'; end $$", dbname=LOG_DB)
        assert await run() == []
        marker = make_events(server)
        await wait_for_log(server, marker)
        mine, total = counted(await run())
        assert only_events(mine) == EVENTS and only_events(total) == EVENTS
        mine, total = counted(await run())
        assert only_events(mine) == {} and only_events(total) == {}

        files_before = set((server.datadir / "log").glob("*.csv"))
        make_events(server)
        await trio.sleep(1.1)  # log_filename has seconds: the rotation gets a new file
        server.psql("select pg_rotate_logfile()")
        marker = make_events(server)
        await wait_for_log(server, marker)
        assert set((server.datadir / "log").glob("*.csv")) - files_before  # a new file exists
        mine, total = counted(await run())
        twice = {k: 2 * v for k, v in EVENTS.items()}
        assert only_events(mine) == twice and only_events(total) == twice
        mine, total = counted(await run())
        assert only_events(mine) == {} and only_events(total) == {}


@pytest.mark.pg
async def test_local_mode_counts_each_line_once_across_runs_and_rotation(log_server) -> None:
    state: dict[str, Any] = {}
    await scenario(log_server, monitoring_dsn(log_server), state)
    assert state["mode"] == "local"


@pytest.mark.pg
async def test_remote_mode_through_pg_read_binary_file(log_server) -> None:
    state: dict[str, Any] = {"force_mode": "remote"}
    dsn = monitoring_dsn(log_server, "pg_read_binary_file(text, bigint, bigint)")
    await scenario(log_server, dsn, state)
    assert state["mode"] == "remote"


@pytest.mark.pg
async def test_remote_mode_through_pg_read_file(log_server) -> None:
    state: dict[str, Any] = {"force_mode": "remote"}
    await scenario(log_server, monitoring_dsn(log_server, "pg_read_file(text, bigint, bigint)"), state)
    assert state["mode"] == "remote"


@pytest.mark.pg
async def test_remote_mode_without_the_grant_says_which_grant(log_server) -> None:
    dsn = monitoring_dsn(log_server)
    async with log_runner(dsn, {"force_mode": "remote"}) as run:
        with pytest.raises(MetricError) as err:
            await run()
    assert "GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint) TO" in err.value.message


@pytest.mark.pg
async def test_without_csvlog_the_metric_says_what_to_configure(pg15, fresh_db, monitor_role) -> None:
    role, password = monitor_role
    async with log_runner(pg15.dsn(user=role, dbname=fresh_db, password=password), {}) as run:
        with pytest.raises(MetricUnavailable) as err:
            await run()
    assert "logging_collector = on" in err.value.message


@pytest.mark.pg
async def test_remote_text_reads_never_split_a_multibyte_character(log_server, monkeypatch) -> None:
    monkeypatch.setattr(sl, "CHUNK_BYTES", 7)  # most chunks end inside a character
    state: dict[str, Any] = {"force_mode": "remote"}
    async with log_runner(monitoring_dsn(log_server, "pg_read_file(text, bigint, bigint)"), state) as run:
        assert await run() == []
        marker = f"marker-{uuid.uuid4().hex}"
        log_server.psql("do $$ begin raise warning 'Größe, €uro, 日本語'; raise warning 'ß€ß€ß€'; "
                        f"raise warning '{marker}'; end $$", dbname=LOG_DB)
        await wait_for_log(log_server, marker)
        mine, total = counted(await run())
    assert mine == {"WARNING": 3} and only_events(total) == {"WARNING": 3}


@pytest.mark.pg
async def test_the_source_delivers_the_counts_every_interval(log_server) -> None:
    config = SourceConfig(name="logs", dsn=monitoring_dsn(log_server), metrics={sl.NAME: 1})
    got: list[Measurement] = []
    reaper = SourceReaper(config, Catalog.for_config(), got.append)

    def summed(column: str) -> int:
        return sum(m.rows[0][column] for m in got)

    async with db.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        with trio.fail_after(20):
            while sl.NAME not in reaper.state.last_fetch:  # the baseline run
                await trio.sleep(0.05)
        await wait_for_log(log_server, make_events(log_server))
        with trio.fail_after(20):
            while summed("fatal") < EVENTS["FATAL"] or summed("warning") < EVENTS["WARNING"]:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert not reaper.state.degraded
    assert {s: summed(s.lower()) for s in EVENTS} == EVENTS
    assert {m.table for m in got} == {sl.NAME}
    assert all(list(m.rows[0])[:len(sl.COLUMNS) + 1] == ["epoch_ns", *sl.COLUMNS] for m in got)


@pytest.mark.pg
async def test_local_mode_reads_the_settings_once_per_connection(log_server) -> None:
    """Issue 14: the settings ride once per connection; a run after the first sends nothing (local mode),
    and a new connection reads them again."""
    dsn = monitoring_dsn(log_server)
    metric = Catalog.for_config().metrics[sl.NAME]
    state: dict[str, Any] = {}
    async with db.open_loop():
        for _connection in range(2):
            conn = await db.open_source_connection(dsn, statement_timeout_seconds=30)
            try:
                sent = []
                for _run in range(3):
                    before = conn.statements
                    ctx = SpecialContext(source=SourceConfig(name="logs", dsn=dsn), server=conn.server, conn=conn,
                                         metric=metric, wall_ns=time.time_ns(), state=state)
                    await sl.server_log_event_counts(ctx)
                    sent.append(conn.statements - before)
            finally:
                await conn.close()
            assert sent == [1, 0, 0]
    assert state["mode"] == "local"
