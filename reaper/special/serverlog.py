"""server_log_event_counts: server log messages per severity since the previous run, from the csvlog files.

Requires `logging_collector = on` and `csvlog` in `log_destination` (otherwise the metric is unavailable:
one warning saying so, and skipped; the settings are read again with each new connection).

Where the files are read
    local   reaper runs on the server's host (osmetrics.on_server_host: unix socket, or a matching
            pg_control) and can list the log directory and read its newest *.csv: the files are read
            directly, on the trio thread (listing a directory and reading a chunk of up to
            INLINE_BYTES take microseconds; a bigger backlog is read and counted in a worker thread).
    remote  otherwise: `pg_ls_logdir()` (pg_monitor) lists them and `pg_read_binary_file(path, offset,
            length)` reads them; the role needs EXECUTE on it (`pg_read_file` is used when only that
            one is granted). Without either the metric fails with the GRANT to run.
    Tests (or an operator) can pin the mode with ctx.state["force_mode"] = "local" | "remote".
    The logging settings and the role's grants are read once per connection (reaper.special.facts).

Never counting a line twice
    Every *.csv file has a cursor in ctx.state: the byte offset read so far (plus, locally, its
    inode) and the first bytes of the file. A file that shrank, got a new inode or a different
    beginning (log_truncate_on_rotation reusing a name) is read again from 0; a new file is read from
    0; files are visited in modification-time order, so a rotation (`pg_rotate_logfile()`) costs
    nothing special. The first run is a baseline: it puts every cursor at the end of its file and
    reports nothing. Reads are bounded (CHUNK_BYTES per read, MAX_BYTES_PER_RUN per run; the rest
    waits for the next run).

Parsing
    A csvlog record ends at a newline outside double quotes; messages may hold commas, quotes and
    newlines. Records are cut on that rule (an incomplete trailing record waits in the cursor for the
    rest of it) and each complete one is parsed with the csv module; only its database_name (field 3)
    and error_severity (field 12) are used, and only counts are kept, never message text. Localised
    severities (de, fr, it, es, pl, ru, sv, tr, ko, zh, ja, ...) are mapped to English.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import attrs
import trio

from reaper.errors import MetricError, MetricUnavailable
from reaper.special import Result, SpecialContext
from reaper.special.facts import server_facts
from reaper.special.osmetrics import on_server_host

log = logging.getLogger("reaper.special.serverlog")

NAME = "server_log_event_counts"
SEVERITIES = ("DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "LOG", "FATAL", "PANIC")
COLUMNS = tuple(s.lower() for s in SEVERITIES) + tuple(f"{s.lower()}_total" for s in SEVERITIES)
DATABASE_FIELD = 2  # csvlog: log_time, user_name, database_name, ...
SEVERITY_FIELD = 11  # ..., transaction_id, error_severity, sql_state_code, message, ...

CHUNK_BYTES = 8 * 1024 * 1024
# A local read and count of up to this many bytes (a 30 s increment of a busy server's csvlog) runs
# inline: a thread hop costs more than the work. Bigger chunks (a backlog) go to a worker thread.
INLINE_BYTES = 256 * 1024
MAX_BYTES_PER_RUN = 64 * 1024 * 1024
RECORD_HEAD_BYTES = 64 * 1024  # of a huge record (a long statement) only its head is kept: enough for field 12
FILE_HEAD_BYTES = 64  # a file's first bytes, to notice it was truncated and rewritten under the same name
MAX_TRACKED_FILES = 2500
# A file this much older than the newest one is finished: an unterminated record at its end (a crash
# mid-write) is counted. Sooner could cut a record still being written into a file that only looks rotated.
FINISHED_AFTER_SECONDS = 60.0

# The severity words PostgreSQL writes under lc_messages = <lang> (its message catalogues), in upper case.
LOCALISED_SEVERITIES: dict[str, dict[str, str]] = {
    "de": {"DEBUG": "DEBUG", "LOG": "LOG", "INFO": "INFO", "HINWEIS": "NOTICE", "WARNUNG": "WARNING",
           "FEHLER": "ERROR", "FATAL": "FATAL", "PANIK": "PANIC"},
    "fr": {"DEBUG": "DEBUG", "LOG": "LOG", "INFO": "INFO", "NOTICE": "NOTICE", "ATTENTION": "WARNING",
           "ERREUR": "ERROR", "FATAL": "FATAL", "PANIC": "PANIC", "PANIQUE": "PANIC"},
    "it": {"DEBUG": "DEBUG", "LOG": "LOG", "INFO": "INFO", "NOTIFICA": "NOTICE", "ATTENZIONE": "WARNING",
           "ERRORE": "ERROR", "FATALE": "FATAL", "PANICO": "PANIC"},
    "es": {"DEPURACIÓN": "DEBUG", "LOG": "LOG", "INFO": "INFO", "NOTA": "NOTICE", "ADVERTENCIA": "WARNING",
           "ERROR": "ERROR", "FATAL": "FATAL", "PANIC": "PANIC"},
    "pl": {"DEBUG": "DEBUG", "DZIENNIK": "LOG", "INFORMACJA": "INFO", "UWAGA": "NOTICE",
           "OSTRZEŻENIE": "WARNING", "BŁĄD": "ERROR", "KATASTROFALNY": "FATAL", "PANIKA": "PANIC"},
    "ru": {"ОТЛАДКА": "DEBUG", "СООБЩЕНИЕ": "LOG", "ИНФОРМАЦИЯ": "INFO", "ЗАМЕЧАНИЕ": "NOTICE",
           "ПРЕДУПРЕЖДЕНИЕ": "WARNING", "ОШИБКА": "ERROR", "ВАЖНО": "FATAL", "ПАНИКА": "PANIC"},
    "sv": {"DEBUG": "DEBUG", "LOGG": "LOG", "INFO": "INFO", "NOTIS": "NOTICE", "VARNING": "WARNING",
           "FEL": "ERROR", "FATALT": "FATAL", "PANIK": "PANIC"},
    "tr": {"DEBUG": "DEBUG", "LOG": "LOG", "BİLGİ": "INFO", "NOT": "NOTICE", "UYARI": "WARNING",
           "HATA": "ERROR", "ÖLÜMCÜL (FATAL)": "FATAL", "KRİTİK": "PANIC"},
    "ko": {"디버그": "DEBUG", "로그": "LOG", "정보": "INFO", "알림": "NOTICE", "경고": "WARNING",
           "오류": "ERROR", "치명적오류": "FATAL", "손상": "PANIC"},
    "zh": {"调试": "DEBUG", "日志": "LOG", "信息": "INFO", "注意": "NOTICE", "警告": "WARNING",
           "错误": "ERROR", "致命错误": "FATAL", "比致命错误还过分的错误": "PANIC"},
    "ja": {"デバッグ": "DEBUG", "ログ": "LOG", "情報": "INFO", "注意": "NOTICE", "警告": "WARNING",
           "エラー": "ERROR", "致命的エラー": "FATAL", "PANIC": "PANIC"},
}
# lc_messages can differ per session, so one file may mix languages: every known word is accepted.
# (No word means different severities in two languages.)
SEVERITY_WORDS: dict[str, str] = {s: s for s in SEVERITIES}
for _words in LOCALISED_SEVERITIES.values():
    SEVERITY_WORDS.update(_words)


def english_severity(word: str) -> str | None:
    """DEBUG..PANIC for a severity as written in a csvlog (any known language), else None."""
    text = word.strip().upper()
    found = SEVERITY_WORDS.get(text)
    if found is None and text.startswith("DEBUG"):
        return "DEBUG"  # DEBUG1..DEBUG5, should a build write them
    return found


@attrs.define
class Counts:
    """Messages per English severity: for the source's database and for the whole instance."""

    database: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(SEVERITIES, 0))
    total: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(SEVERITIES, 0))
    unknown: int = 0  # records whose severity word is not recognised

    def row(self, epoch_ns: int) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch_ns": epoch_ns}
        row.update({s.lower(): self.database[s] for s in SEVERITIES})
        row.update({f"{s.lower()}_total": self.total[s] for s in SEVERITIES})
        return row


def count_record(record: bytes, database: str, counts: Counts) -> None:
    """Parse one csvlog record (complete, or the head of a huge one) and count it."""
    text = record.decode("utf-8", errors="replace")
    fields = next(csv.reader(io.StringIO(text, newline="")), None)
    if not fields or len(fields) <= SEVERITY_FIELD:
        return
    severity = english_severity(fields[SEVERITY_FIELD])
    if severity is None:
        counts.unknown += 1
        return
    counts.total[severity] += 1
    if fields[DATABASE_FIELD] == database:
        counts.database[severity] += 1


# A record starts with its log_time: "2024-05-01 12:34:56.789 UTC,..."
TIMESTAMP_BYTES = len(b"2024-05-01 12:34:56")
RECORD_START = re.compile(rb"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
NEXT_RECORD_START = re.compile(rb"\n(?=\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")


@attrs.define
class RecordSplitter:
    """Cuts a csvlog byte stream into records: a record ends at a newline outside double quotes
    (a quote inside a field is doubled, so counting quotes per line keeps the parity right).

    `synced` False means the stream was entered at an arbitrary offset (a baseline): bytes are
    skipped up to the first line that starts with a timestamp.
    """

    synced: bool = True
    in_quote: bool = False
    buf: bytearray = attrs.field(factory=bytearray)  # the current record so far (its head)

    def feed(self, data: bytes, on_record: Callable[[bytes], None]) -> None:
        start, end = 0, len(data)
        if not self.synced:
            data = bytes(self.buf) + data  # while unsynced, buf holds the tail a timestamp may start in
            self.buf.clear()
            start, end = 0, len(data)
            if len(data) < TIMESTAMP_BYTES + 1:
                self.buf += data
                return
            if RECORD_START.match(data):
                self.synced = True
            else:
                found = NEXT_RECORD_START.search(data)
                if found is None:
                    self.buf += data[-TIMESTAMP_BYTES:]
                    return
                self.synced, start = True, found.start() + 1
        buf = self.buf
        while start < end:
            nl = data.find(b"\n", start)
            stop = end if nl < 0 else nl + 1
            if data.count(b'"', start, stop) & 1:
                self.in_quote = not self.in_quote
            room = RECORD_HEAD_BYTES - len(buf)
            if room > 0:
                buf += data[start:min(stop, start + room)]
            if nl >= 0 and not self.in_quote:
                on_record(bytes(buf))
                buf.clear()
            start = stop

    def flush(self, on_record: Callable[[bytes], None]) -> None:
        """The file is finished: count what is left of an unterminated record (a crash mid-write)."""
        if self.synced and self.buf.strip():
            on_record(bytes(self.buf))
        self.buf.clear()
        self.in_quote = False


@attrs.define
class Cursor:
    """How far one log file has been read."""

    offset: int = 0
    inode: int | None = None
    head: bytes | None = None  # the file's first bytes (None: not known yet)
    splitter: RecordSplitter = attrs.field(factory=RecordSplitter)

    def consume(self, data: bytes, database: str, counts: Counts) -> None:
        """Count the complete records in `data` (the bytes at `offset`) and move past them.
        Runs inline, or in a worker thread for a big chunk; the offset moves in the same call, so a
        cancelled run never leaves counted bytes unread or read bytes uncounted."""
        if self.offset == 0 and self.head is None:
            self.head = data[:FILE_HEAD_BYTES]
        self.splitter.feed(data, lambda record: count_record(record, database, counts))
        self.offset += len(data)

    def finish(self, database: str, counts: Counts) -> None:
        self.splitter.flush(lambda record: count_record(record, database, counts))


@attrs.frozen
class LogFile:
    name: str
    size: int
    mtime: float
    inode: int | None = None


# -- readers ---------------------------------------------------------------------------------------


def list_local(directory: str) -> list[LogFile]:
    files = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.endswith(".csv"):
                continue
            try:
                st = entry.stat()
            except OSError:
                continue  # removed meanwhile
            if entry.is_file():
                files.append(LogFile(entry.name, st.st_size, st.st_mtime, st.st_ino))
    return files


def read_local(path: str, offset: int, length: int, head_length: int) -> tuple[bytes, bytes | None]:
    with open(path, "rb") as f:
        head = None
        if head_length:
            head = f.read(head_length)
        f.seek(offset)
        return f.read(length), head


def local_readable(directory: str) -> str | None:
    """None when the directory can be listed and its newest *.csv read; else why not."""
    try:
        files = list_local(directory)
    except OSError as e:
        return f"cannot list {directory}: {e.strerror or e}"
    if files:
        newest = max(files, key=lambda f: (f.mtime, f.name))
        try:
            with open(os.path.join(directory, newest.name), "rb") as f:
                f.read(1)
        except OSError as e:
            return f"cannot read {newest.name} in {directory}: {e.strerror or e}"
    return None


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


class LocalReader:
    mode = "local"

    def __init__(self, directory: str) -> None:
        self.directory = directory

    async def list(self) -> list[LogFile]:
        return list_local(self.directory)  # one directory of log files: inline

    async def read(self, f: LogFile, offset: int, length: int, head_length: int) -> tuple[bytes, bytes | None]:
        path = os.path.join(self.directory, f.name)
        try:
            if length <= INLINE_BYTES:
                return read_local(path, offset, length, head_length)
            return await trio.to_thread.run_sync(read_local, path, offset, length, head_length)
        except FileNotFoundError:
            return b"", None


class RemoteReader:
    """pg_ls_logdir() + pg_read_binary_file() (or pg_read_file()) through the source's connection."""

    mode = "remote"
    LIST_SQL = ("select name, size, extract(epoch from modification)::float8 as mtime"
                " from pg_ls_logdir() where name like '%.csv'")

    def __init__(self, ctx: SpecialContext, log_directory: str, binary: bool) -> None:
        self.ctx = ctx
        self.log_directory = log_directory  # the setting: relative to the data directory, or absolute
        self.binary = binary

    async def list(self) -> list[LogFile]:
        try:
            rows = await self.ctx.conn.fetch(self.LIST_SQL)
        except Exception as e:
            if _sqlstate(e) is None:
                raise
            raise MetricError(NAME, f"pg_ls_logdir() failed: {e} (the monitoring role needs pg_monitor)") from e
        return [LogFile(str(r["name"]), int(r["size"]), float(r["mtime"])) for r in rows]

    def _path(self, name: str) -> str:
        return f"{self.log_directory.rstrip('/')}/{name}"

    async def _fetch_bytes(self, path: str, offset: int, length: int) -> bytes:
        if self.binary:
            rows = await self.ctx.conn.fetch("select pg_read_binary_file($1, $2, $3) as data", path, offset, length)
            return bytes(rows[0]["data"] or b"")
        # pg_read_file() refuses text that ends in the middle of a multibyte character: read a little less
        last: Exception | None = None
        for trim in range(4):
            if length - trim <= 0:
                break
            try:
                rows = await self.ctx.conn.fetch(
                    "select convert_to(pg_read_file($1, $2, $3), getdatabaseencoding()) as data",
                    path, offset, length - trim)
                return bytes(rows[0]["data"] or b"")
            except Exception as e:
                if _sqlstate(e) not in ("22021", "22P05"):
                    raise
                last = e
        raise MetricError(NAME, f"pg_read_file() cannot read {path} at {offset}: {last}; grant EXECUTE on "
                                "pg_read_binary_file(text, bigint, bigint) instead (it reads bytes)")

    async def read(self, f: LogFile, offset: int, length: int, head_length: int) -> tuple[bytes, bytes | None]:
        path = self._path(f.name)
        try:
            head = await self._fetch_bytes(path, 0, head_length) if head_length else None
            return await self._fetch_bytes(path, offset, length), head
        except MetricError:
            raise
        except Exception as e:
            if _sqlstate(e) == "58P01":  # the file is gone (rotated away and removed meanwhile)
                return b"", None
            if _sqlstate(e) is None:
                raise
            raise MetricError(NAME, f"reading {path} failed: {e}") from e


Reader = LocalReader | RemoteReader

async def log_settings(ctx: SpecialContext) -> dict[str, Any]:
    """The logging settings and the role's grants (read once per connection: reaper.special.facts);
    MetricError when csvlog files are not written."""
    facts = await server_facts(ctx)
    settings: dict[str, Any] = {
        "logging_collector": facts.logging_collector, "log_destination": facts.log_destination,
        "log_directory": facts.log_directory, "data_directory": facts.data_directory, "role": facts.role,
        "can_read_binary": facts.can_read_binary, "can_read_text": facts.can_read_text}
    problems = []
    if str(settings["logging_collector"]).lower() != "on":
        problems.append(f"logging_collector = on (it is {settings['logging_collector']})")
    destinations = {d.strip().lower() for d in str(settings["log_destination"]).split(",")}
    if "csvlog" not in destinations:
        problems.append(f"csvlog in log_destination (it is '{settings['log_destination']}')")
    if problems:  # the server's setup, not a failure: one warning, skipped (read again on a new connection)
        raise MetricUnavailable(NAME, "needs " + " and ".join(problems) + " on the server: it counts the csvlog "
                                "files")
    return settings


async def choose_reader(ctx: SpecialContext, settings: dict[str, Any]) -> Reader:
    directory = os.path.join(str(settings["data_directory"]), str(settings["log_directory"]))
    forced = ctx.state.get("force_mode")
    why_not_local = None
    if forced == "remote":
        why_not_local = "remote mode forced"
    elif forced != "local":
        local, why = await on_server_host(ctx)
        why_not_local = None if local else why
    if why_not_local is None:
        why_not_local = local_readable(directory)  # a directory listing and a 1-byte read: inline
        if why_not_local is None:
            return LocalReader(directory)
        if forced == "local":
            raise MetricError(NAME, f"local mode forced but {why_not_local}")
    if settings["can_read_binary"] or settings["can_read_text"]:
        return RemoteReader(ctx, str(settings["log_directory"]), binary=bool(settings["can_read_binary"]))
    role = settings["role"]
    raise MetricError(NAME, f"cannot read the log files locally ({why_not_local}) nor through the server: run "
                            f"GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint) TO "
                            f"\"{role}\"; in database {ctx.server.database} (or the same on pg_read_file(text, "
                            "bigint, bigint))")


# -- the metric ------------------------------------------------------------------------------------


async def server_log_event_counts(ctx: SpecialContext) -> Result:
    state = ctx.state
    identity = (ctx.server.system_identifier, ctx.server.address)
    if state.get("identity") != identity:  # another server: its files are other files
        for key in ("identity", "files", "pending", "mode"):
            state.pop(key, None)
        state["identity"] = identity
    settings = await log_settings(ctx)
    reader = await choose_reader(ctx, settings)
    if state.get("mode") != reader.mode:
        where = reader.directory if isinstance(reader, LocalReader) else (
            "pg_ls_logdir() and " + ("pg_read_binary_file()" if reader.binary else "pg_read_file()"))
        log.info("source %s: %s: reading the csvlog files %s %s", ctx.source.name, NAME,
                 "in" if reader.mode == "local" else "through", where)
        state["mode"] = reader.mode
    files = sorted(await reader.list(), key=lambda f: (f.mtime, f.name))[-MAX_TRACKED_FILES:]
    cursors: dict[str, Cursor] | None = state.get("files")
    if cursors is None:  # baseline: everything written so far is history
        state["files"] = {f.name: Cursor(offset=f.size, inode=f.inode, splitter=RecordSplitter(synced=f.size == 0))
                          for f in files}
        state["pending"] = Counts()
        return []
    counts: Counts = state.setdefault("pending", Counts())
    database = ctx.server.database
    present = {f.name for f in files}
    for name in [n for n in cursors if n not in present]:
        del cursors[name]
    budget = MAX_BYTES_PER_RUN
    newest_mtime = files[-1].mtime if files else 0.0
    for f in files:
        cursor = cursors.get(f.name)
        if cursor is None or (f.inode is not None and cursor.inode is not None and f.inode != cursor.inode) \
                or f.size < cursor.offset:
            cursor = cursors[f.name] = Cursor(inode=f.inode)  # new, replaced or truncated: from the start
        cursor.inode = f.inode if f.inode is not None else cursor.inode
        if cursor.offset < f.size and budget > 0:
            head_length = FILE_HEAD_BYTES if cursor.offset > 0 else 0
            length = min(CHUNK_BYTES, f.size - cursor.offset, budget)
            data, head = await reader.read(f, cursor.offset, length, head_length)
            if head is not None and cursor.head is not None and head[:len(cursor.head)] != cursor.head[:len(head)]:
                cursor = cursors[f.name] = Cursor(inode=f.inode)  # rewritten under the same name
                data, _ = await reader.read(f, 0, min(CHUNK_BYTES, f.size, budget), 0)
            elif head is not None and len(head) > len(cursor.head or b""):
                cursor.head = head
            while data:
                budget -= len(data)
                if len(data) <= INLINE_BYTES:
                    cursor.consume(data, database, counts)
                else:  # a backlog: counting it takes milliseconds, so other sources' ticks stay on time
                    await trio.to_thread.run_sync(cursor.consume, data, database, counts)
                if cursor.offset >= f.size or budget <= 0:
                    break
                data, _ = await reader.read(f, cursor.offset, min(CHUNK_BYTES, f.size - cursor.offset, budget), 0)
        if cursor.offset >= f.size and newest_mtime - f.mtime > FINISHED_AFTER_SECONDS:
            cursor.finish(database, counts)  # rotated away long ago: nothing more will be appended
    state["pending"] = Counts()
    return [(NAME, [counts.row(ctx.wall_ns)])]

