"""The on-disk spill queue of one sink: where its measurements wait while it is slow or down.

A directory of append-only segment files (`<n>.seg`); each record is a 4-byte big-endian length
and one measurement as JSON (values as the sinks would write them: Decimal -> number, datetime ->
ISO 8601, NaN -> null). Every append is one `write()` to the kernel, so a SIGKILL loses nothing
that was appended. The read position (segment, offset) is kept in `head`, replaced atomically
after each committed batch: after a crash the queue replays from the last commit (at least once).

Bounded by `max_bytes`: when an append would pass it, the oldest segment is deleted and its
records are counted as dropped.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any

import orjson

from reaper.measurement import Measurement
from reaper.sinks.jsonfile import json_default

log = logging.getLogger("reaper.sinks.spill")

SEGMENT_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct(">I")


def encode(m: Measurement) -> bytes:
    doc = {"s": m.source, "m": m.metric, "t": m.table, "e": m.epoch_ns, "r": list(m.rows), "g": dict(m.tags)}
    return orjson.dumps(doc, default=json_default, option=orjson.OPT_NON_STR_KEYS)


def decode(data: bytes) -> Measurement:
    doc: dict[str, Any] = orjson.loads(data)
    return Measurement(source=doc["s"], metric=doc["m"], table=doc["t"], epoch_ns=doc["e"],
                       rows=tuple(doc["r"]), tags=doc["g"])


class SpillQueue:
    """A FIFO of measurements on disk, bounded in bytes."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.count = 0  # records not yet committed
        self.bytes = 0  # on disk, from the head on
        self.dropped = 0
        self._segments: list[int] = []  # segment numbers, oldest first
        self._counts: dict[int, int] = {}  # records per segment from the head on
        self._head = (0, 0)  # (segment, offset) of the next record to read
        self._fd: int | None = None  # the tail segment, open for append
        self._tail_size = 0

    def __repr__(self) -> str:
        return f"<SpillQueue {self.directory} {self.count} records {self.bytes} bytes>"

    def __len__(self) -> int:
        return self.count

    # -- opening and recovery ------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory, or recover what a previous run left (dropping a torn last record)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segments = sorted(int(p.stem) for p in self.directory.glob("*.seg"))
        head_file = self.directory / "head"
        if head_file.exists():
            seg, off = (int(x) for x in head_file.read_text().split())
            self._head = (seg, off)
        elif self._segments:
            self._head = (self._segments[0], 0)
        for seg in list(self._segments):
            if seg < self._head[0]:
                self._path(seg).unlink(missing_ok=True)
                self._segments.remove(seg)
        for seg in self._segments:
            start = self._head[1] if seg == self._head[0] else 0
            count, size, valid_end = self._scan(seg, start)
            if valid_end is not None:  # a torn record at the end (killed mid-write): cut it off
                os.truncate(self._path(seg), valid_end)
            self._counts[seg] = count
            self.count += count
            self.bytes += size
        if self.count:
            log.warning("spill %s: %d measurements (%d bytes) from an earlier run will be replayed first",
                        self.directory.name, self.count, self.bytes)

    def _scan(self, seg: int, start: int) -> tuple[int, int, int | None]:
        data = self._path(seg).read_bytes()
        pos, count = start, 0
        while pos + _LEN.size <= len(data):
            (length,) = _LEN.unpack_from(data, pos)
            if pos + _LEN.size + length > len(data):
                break
            pos += _LEN.size + length
            count += 1
        return count, pos - start, (pos if pos != len(data) else None)

    def _path(self, seg: int) -> Path:
        return self.directory / f"{seg:08d}.seg"

    # -- writing -------------------------------------------------------------------------------

    def append(self, m: Measurement) -> None:
        """Append one measurement (one write() to the kernel). Makes room by dropping the oldest
        segment when the bound would be passed. Raises OSError when the disk refuses."""
        payload = encode(m)
        record = _LEN.pack(len(payload)) + payload
        while self.bytes + len(record) > self.max_bytes and len(self._segments) > 1:
            self._drop_oldest_segment()
        if self.bytes + len(record) > self.max_bytes:
            self.dropped += 1
            return
        if self._fd is None or self._tail_size + len(record) > SEGMENT_BYTES:
            self._roll()
        assert self._fd is not None
        view = memoryview(record)
        while view:
            view = view[os.write(self._fd, view):]
        self._tail_size += len(record)
        tail = self._segments[-1]
        self._counts[tail] = self._counts.get(tail, 0) + 1
        self.count += 1
        self.bytes += len(record)

    def _roll(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        seg = (self._segments[-1] + 1) if self._segments else 1
        if not self._segments:
            self._head = (seg, 0)
            self._write_head()
        self._segments.append(seg)
        self._fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._tail_size = os.fstat(self._fd).st_size

    def _drop_oldest_segment(self) -> None:
        seg = self._segments.pop(0)
        dropped = self._counts.pop(seg, 0)
        start = self._head[1] if seg == self._head[0] else 0
        size = self._path(seg).stat().st_size - start
        self._path(seg).unlink(missing_ok=True)
        self.count -= dropped
        self.bytes -= size
        self.dropped += dropped
        self._head = (self._segments[0], 0)
        self._write_head()

    # -- reading -------------------------------------------------------------------------------

    def peek(self, limit: int) -> list[Measurement]:
        """Up to `limit` measurements from the head, oldest first, without removing them."""
        out: list[Measurement] = []
        seg, off = self._head
        for s in self._segments:
            if s < seg:
                continue
            with self._path(s).open("rb") as f:
                f.seek(off if s == seg else 0)
                while len(out) < limit:
                    header = f.read(_LEN.size)
                    if len(header) < _LEN.size:
                        break
                    (length,) = _LEN.unpack(header)
                    out.append(decode(f.read(length)))
            if len(out) >= limit:
                break
        return out

    def commit(self, n: int) -> None:
        """Remove the first n measurements (they were written by the sink)."""
        seg, off = self._head
        while n > 0 and self._segments:
            path = self._path(seg)
            with path.open("rb") as f:
                f.seek(off)
                while n > 0:
                    header = f.read(_LEN.size)
                    if len(header) < _LEN.size:
                        break
                    (length,) = _LEN.unpack(header)
                    f.seek(length, os.SEEK_CUR)
                    off += _LEN.size + length
                    self.bytes -= _LEN.size + length
                    self.count -= 1
                    self._counts[seg] -= 1
                    n -= 1
            if self._counts.get(seg, 0) == 0 and seg != self._segments[-1]:
                self._segments.remove(seg)
                self._counts.pop(seg, None)
                path.unlink(missing_ok=True)
                seg, off = self._segments[0], 0
        self._head = (seg, off)
        if self.count == 0:
            self._reset()
        else:
            self._write_head()

    def _reset(self) -> None:
        """Empty: start over with no segment files."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for s in self._segments:
            self._path(s).unlink(missing_ok=True)
        self._segments, self._counts = [], {}
        self._tail_size, self.bytes, self.count = 0, 0, 0
        (self.directory / "head").unlink(missing_ok=True)
        self._head = (0, 0)

    def _write_head(self) -> None:
        tmp = self.directory / "head.tmp"
        tmp.write_text(f"{self._head[0]} {self._head[1]}\n")
        os.replace(tmp, self.directory / "head")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
