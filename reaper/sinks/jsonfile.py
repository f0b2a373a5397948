"""jsonfile sink: one JSON object per line, in pgwatch's format.

    {"metric": ..., "dbname": ..., "custom_tags": {...}, "data": [{row}, ...]}

Values are written as pgwatch (Go) writes them: reaper/sinks/encode.py.

Every write runs in the sink's own long-lived thread (reaper.sinks.writer): a file system that stops answering
(an NFS server gone, a frozen file system) or a reader that lags (stdout, a named pipe) holds up this sink
only; a pipe's write is given up at shutdown. The open runs in a worker thread too (a named pipe's open waits
for a reader), given up at shutdown.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path
from typing import IO

import trio

from reaper.config.schema import JsonFileSinkConfig
from reaper.errors import SinkError
from reaper.fsutil import PRIVATE_FILE_MODE, open_append
from reaper.measurement import Measurement
from reaper.sinks.encode import dumps, dumps_ready
from reaper.sinks.writer import WriterThread

log = logging.getLogger("reaper.sinks")
# The window of the runner's write gathering (reaper.sinks.runner): each burst of work's measurements are
# written when the burst ends (reaper.quiet), up to WRITES_PER_GATHER writes per window; then what arrives
# waits for the window's end and shares one write. A fleet of 300 sources made ~4 writes per source tick
# (each source's measurements arrive in 2-3 bursts); a fixed 0.2 s wait after each first measurement
# merged them, but was one more wake-up of the process per tick.
GATHER_SECONDS = 0.2


def encode_measurement(m: Measurement) -> bytes:
    rows = m.rows if type(m.rows) is list else list(m.rows)
    tags = m.tags if type(m.tags) is dict else dict(m.tags)
    doc = {"metric": m.table, "dbname": m.source, "custom_tags": tags, "data": rows}
    return (dumps_ready(doc) if m.go_ready else dumps(doc)) + b"\n"


def open_output(path: Path, file_mode: int = PRIVATE_FILE_MODE) -> IO[bytes]:
    """Create the parent folders and open the file for appending, created with `file_mode` (0600 unless
    configured: measurements are the operator's data); SinkError("cannot open PATH: reason") when that fails
    (the sink's task logs it, retries, and spills meanwhile). New folders get the file mode plus x where it
    has r (0600 -> 0700, 0640 -> 0750), so whoever may read the file can reach it."""
    try:
        if not path.parent.is_dir():
            folder_mode = file_mode | ((file_mode & 0o444) >> 2)
            path.parent.mkdir(parents=True, exist_ok=True, mode=folder_mode)
        return os.fdopen(open_append(path, file_mode), "ab", buffering=0)
    except (FileExistsError, NotADirectoryError) as e:  # a regular file where a folder should be
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is not a directory" if blocker is not None else e.strerror
        raise SinkError(f"cannot open {path}: {why}") from e
    except OSError as e:
        raise SinkError(f"cannot open {path}: {e.strerror or e}") from e


class JsonFileSink:
    def __init__(self, config: JsonFileSinkConfig) -> None:
        self.config = config
        self.label = config.label
        self._file: IO[bytes] | None = None
        self._regular = False  # the path is a regular file (not a pipe: its writes are not given up)
        self._writer = WriterThread(f"reaper {config.label}"[:60])
        self.written = 0
        self.gather_seconds = GATHER_SECONDS

    def __repr__(self) -> str:
        return f"<JsonFileSink {self.config.path} written={self.written}>"

    async def open(self, beside: trio.Nursery | None = None) -> None:
        if self.config.path == "-":
            self._file = sys.stdout.buffer
            return
        # (a named pipe's open waits for its reader: a shutdown meanwhile leaves that thread behind)
        f = self._file = await trio.to_thread.run_sync(open_output, Path(self.config.path), self.config.file_mode,
                                                       abandon_on_cancel=True)
        self._regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)

    async def write(self, batch: list[Measurement]) -> None:
        data = b"".join([encode_measurement(m) for m in batch])
        # a pipe's writer blocked by its reader is given up at shutdown (the batch is then kept, and may come
        # again at the next start: a pipe is no file to truncate)
        await self._writer.call(self._write, data, abandon=not self._regular)
        self.written += len(batch)

    def _rotate_if_needed(self, incoming: int) -> None:
        """Size-based rotation: path -> path.1 -> ... -> path.<backups> (the oldest is removed)."""
        limit = self.config.max_bytes
        f = self._file
        if not limit or f is None or not f.seekable():
            return
        size = f.seek(0, 2)
        if size == 0 or size + incoming <= limit:
            return
        f.close()
        self._file = None  # reopened below, or by the next write when that fails
        path = Path(self.config.path)
        backups = max(0, self.config.backups)
        if backups == 0:
            path.unlink(missing_ok=True)
        else:
            Path(f"{path}.{backups}").unlink(missing_ok=True)
            for n in range(backups - 1, 0, -1):
                older = Path(f"{path}.{n}")
                if older.exists():
                    older.rename(f"{path}.{n + 1}")
            path.rename(f"{path}.1")
        self._file = open_output(path, self.config.file_mode)

    def _reopen_if_moved(self) -> None:
        """logrotate's default (move the file, let the writer make a new one) or the file deleted: the path no
        longer names the file this sink has open, so it opens the path anew instead of writing on into the
        moved (or deleted) file. One stat per write of a batch."""
        f = self._file
        if f is None or not self._regular:
            return
        try:
            now = os.stat(self.config.path)
        except FileNotFoundError:
            now = None
        except OSError:
            return
        mine = os.fstat(f.fileno())
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return
        log.info("sink %s: %s was moved or removed (rotated?); writing to a new one", self.label, self.config.path)
        self._file = None
        f.close()
        self._file = open_output(Path(self.config.path), self.config.file_mode)

    def _write(self, data: bytes) -> None:
        if self._file is None:  # a rotation could not reopen the file: an outage, retried
            self._file = open_output(Path(self.config.path), self.config.file_mode)
        self._reopen_if_moved()
        self._rotate_if_needed(len(data))
        f = self._file
        assert f is not None
        start = f.tell() if f.seekable() else None
        try:
            view = memoryview(data)
            while view:  # an unbuffered file may take a write in parts
                written = f.write(view)
                view = view[written or 0:]
            f.flush()
        except OSError:
            # a partial batch (disk full) is cut off again, so the retry does not duplicate lines
            if start is not None:
                try:
                    f.truncate(start)
                    f.seek(start)
                except OSError:
                    self._file = None  # reopened by the next write
                    f.close()
            raise

    async def aclose(self) -> None:
        try:  # (in the writer's thread: after the writes before it, and not while one runs)
            await self._writer.call(self._close, abandon=True)
        finally:
            self._writer.close()

    def _close(self) -> None:
        f, self._file = self._file, None
        if f is not None and f is not sys.stdout.buffer:
            f.close()
