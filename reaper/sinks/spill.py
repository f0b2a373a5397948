"""The on-disk spill queue of one sink: where its measurements wait while it is slow or down.

A directory of append-only segment files (`<n>.seg`); each record is a 4-byte big-endian length and one
measurement as JSON (values as the sinks write them: reaper/sinks/encode.py). Every append is one
`write()` to the kernel, so a SIGKILL loses nothing that was appended. The read position (segment,
offset) is kept in `head`, replaced atomically after each committed batch: after a crash the queue
replays from the last commit (at least once).

Bounded by `max_bytes`: when an append would pass it, the oldest segment is deleted and its
records are counted as dropped.

Faults (issue 12). A full disk: an append that fails is cut back off (no torn record) and the caller counts
the measurement as dropped; saving the position needs no free space first (drained segments are unlinked
before it when the disk is full) and never raises. A kill at any instant: the position is saved (temp file,
fsync, rename) before drained segments are unlinked; at open a position whose segment is gone moves to the
oldest segment left, and a torn tail record is cut off and counted. The size of the batch being written is
saved with the position (`take`), so after a kill the same batch is taken again and a sink that fingerprints
batches (postgres) stores it once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from pathlib import Path
from typing import Any

import orjson

from reaper.fsutil import make_private_dir
from reaper.measurement import Measurement
from reaper.sinks.encode import dumps

log = logging.getLogger("reaper.sinks.spill")

SEGMENT_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct(">I")
# Free space the spill never takes, so the status file, the head and the rejected/ files can still be
# written on a full disk (a status that cannot be written hides the drops); refused appends resume only once
# twice this is free again, so a nearly full disk does not flap between refusing and taking.
DISK_RESERVE_BYTES = 256 * 1024
_HEAD_BYTES = 64  # `head` is always this long (padded), so a full disk can overwrite it in place


def encode(m: Measurement) -> bytes:
    doc = {"s": m.source, "m": m.metric, "t": m.table, "e": m.epoch_ns, "r": list(m.rows), "g": dict(m.tags)}
    return dumps(doc)


def decode(data: bytes) -> Measurement:
    doc: dict[str, Any] = orjson.loads(data)
    return Measurement(source=doc["s"], metric=doc["m"], table=doc["t"], epoch_ns=doc["e"],
                       rows=tuple(doc["r"]), tags=doc["g"])


class SpillQueue:
    """A FIFO of measurements on disk, bounded in bytes. Never raises for a full disk except in `append`
    (the caller counts that measurement as dropped); `take`/`commit` keep going without free space."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.count = 0  # records not yet committed
        self.bytes = 0  # on disk, from the head on
        self.dropped = 0  # records lost: the bound, torn or unreadable records
        self.generation = 0  # bumped when records are dropped from the front (a taken batch is then stale)
        self._segments: list[int] = []  # segment numbers, oldest first
        self._counts: dict[int, int] = {}  # records per segment from the head on
        self._head = (0, 0)  # (segment, offset) of the next record to read
        self._inflight: int | None = None  # records of the batch being written (in `head`, for a restart)
        self._last_seg = 0  # the highest segment number used: new segments are numbered above it
        self._fd: int | None = None  # the tail segment, open for append
        self._tail_size = 0
        self._head_dirty = False  # the last head could not be saved (disk full): saved again at the next chance
        self._disk_full = False  # appends refused until 2 x DISK_RESERVE_BYTES are free again

    def __repr__(self) -> str:
        return f"<SpillQueue {self.directory} {self.count} records {self.bytes} bytes dropped={self.dropped}>"

    def __len__(self) -> int:
        return self.count

    # -- opening and recovery ------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory, or recover what a previous run left: a head whose segment is gone is moved
        to the oldest segment left; a torn last record (killed mid-write) is cut off and counted."""
        make_private_dir(self.directory)
        (self.directory / "head.tmp").unlink(missing_ok=True)
        self._segments = sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())
        head = self._read_head()
        if head is None:
            head = ((self._segments[0], 0) if self._segments else (0, 0), None)
        (seg, off), self._inflight = head
        for old in [s for s in self._segments if s < seg]:  # drained; a kill came before their unlink
            self._path(old).unlink(missing_ok=True)
            self._segments.remove(old)
        if self._segments and self._segments[0] != seg:
            if seg:
                log.info("spill %s: segment %d of the saved position is gone; replaying from segment %d",
                         self.directory.name, seg, self._segments[0])
            seg, off, self._inflight = self._segments[0], 0, None
        self._head = (seg, off)
        self._last_seg = max([seg, *self._segments])
        for s in self._segments:
            start = off if s == seg else 0
            count, size, valid_end, torn = self._scan(s, start)
            if valid_end is not None:  # a torn record (killed or disk full mid-write): cut off, counted
                os.truncate(self._path(s), valid_end)
                self.dropped += torn
                log.warning("spill %s: a torn record at the end of segment %d was cut off (%d dropped)",
                            self.directory.name, s, torn)
            self._counts[s] = count
            self.count += count
            self.bytes += size
        if self.count:
            log.warning("spill %s: %d measurements (%d bytes) waiting in the queue (left by an earlier run, or by "
                        "the sink a reload replaced) will be replayed first", self.directory.name, self.count,
                        self.bytes)

    def _read_head(self) -> tuple[tuple[int, int], int | None] | None:
        try:
            fields = [int(x) for x in (self.directory / "head").read_text().split()]
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("spill %s: unreadable head (%s); replaying from the oldest segment", self.directory.name, e)
            return None
        if len(fields) not in (2, 3) or min(fields) < 0:
            log.warning("spill %s: unreadable head %r; replaying from the oldest segment", self.directory.name,
                        fields)
            return None
        return (fields[0], fields[1]), (fields[2] if len(fields) == 3 and fields[2] > 0 else None)

    def _scan(self, seg: int, start: int) -> tuple[int, int, int | None, int]:
        """(records, bytes, where valid data ends when a torn tail follows it, torn records)."""
        data = self._path(seg).read_bytes()
        start = min(start, len(data))
        pos, count = start, 0
        while pos + _LEN.size <= len(data):
            (length,) = _LEN.unpack_from(data, pos)
            end = pos + _LEN.size + length
            if length < 2 or end > len(data) or data[pos + _LEN.size] != 0x7B or data[end - 1] != 0x7D:
                break  # a record is a JSON object: "{...}"
            pos = end
            count += 1
        torn = 1 if pos != len(data) else 0
        return count, pos - start, (pos if torn else None), torn

    def _path(self, seg: int) -> Path:
        return self.directory / f"{seg:08d}.seg"

    # -- writing -------------------------------------------------------------------------------

    def append(self, m: Measurement) -> None:
        """Append one measurement (one write() to the kernel). Makes room by dropping the oldest
        segment when the bound would be passed. Raises OSError when the disk refuses (ENOSPC): nothing
        of the record stays on disk, the caller counts it as dropped."""
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
        self._check_free_space(len(record))
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            with contextlib.suppress(OSError):  # shrinking needs no space: no torn record is left behind
                os.ftruncate(self._fd, self._tail_size)
            raise
        self._tail_size += len(record)
        tail = self._segments[-1]
        self._counts[tail] = self._counts.get(tail, 0) + 1
        self.count += 1
        self.bytes += len(record)

    def _check_free_space(self, needed: int) -> None:
        """OSError(ENOSPC) when taking `needed` bytes would leave less than the reserve free."""
        st = os.fstatvfs(self._fd) if self._fd is not None else os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        reserve = DISK_RESERVE_BYTES * (2 if self._disk_full else 1)
        self._disk_full = free - needed < reserve
        if self._disk_full:
            raise OSError(errno.ENOSPC, f"No space left on device (the spill keeps {DISK_RESERVE_BYTES // 1024} KB "
                                        f"free for the status file)", str(self.directory))

    def _roll(self) -> None:
        seg = self._last_seg + 1
        fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # may raise: nothing changed
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._last_seg = fd, seg
        self._segments.append(seg)
        self._counts.setdefault(seg, 0)
        self._tail_size = os.fstat(fd).st_size
        if len(self._segments) == 1:
            self._head, self._inflight = (seg, 0), None
            self._save_head()  # not needed for safety: a head whose segment is gone is moved on at open

    def _drop_oldest_segment(self) -> None:
        seg = self._segments.pop(0)
        dropped = self._counts.pop(seg, 0)
        start = self._head[1] if seg == self._head[0] else 0
        path = self._path(seg)
        with contextlib.suppress(OSError):
            self.bytes -= path.stat().st_size - start
        path.unlink(missing_ok=True)  # first: frees the space the head needs (a gone segment is skipped at open)
        self.count -= dropped
        self.dropped += dropped
        self.generation += 1
        self._head, self._inflight = (self._segments[0], 0), None
        self._save_head()

    # -- reading -------------------------------------------------------------------------------

    def peek(self, limit: int) -> list[Measurement]:
        """Up to `limit` measurements from the head, oldest first, without removing them (unreadable
        records are left out)."""
        return [m for m in self._read(limit) if m is not None]

    def take(self, limit: int) -> list[Measurement | None]:
        """The next batch to write: up to `limit` records from the head (None for an unreadable one).

        How many is saved in `head` first, so that after a kill the same batch is taken again: a sink that
        fingerprints its batches (postgres) then recognises one it had committed, and stores nothing twice.
        """
        if self._inflight is not None:
            limit = min(limit, self._inflight)
        batch = self._read(limit)
        if batch and self._inflight != len(batch):
            self._inflight = len(batch)
            self._save_head()
        return batch

    def _read(self, limit: int) -> list[Measurement | None]:
        out: list[Measurement | None] = []
        seg, off = self._head
        for s in self._segments:
            if s < seg:
                continue
            with self._path(s).open("rb") as f:
                f.seek(off if s == seg else 0)
                for _ in range(min(limit - len(out), self._counts.get(s, 0))):
                    header = f.read(_LEN.size)
                    if len(header) < _LEN.size:
                        break
                    (length,) = _LEN.unpack(header)
                    try:
                        out.append(decode(f.read(length)))
                    except (ValueError, KeyError, TypeError) as e:
                        log.error("spill %s: an unreadable record in segment %d is skipped: %s",
                                  self.directory.name, s, e)
                        out.append(None)
            if len(out) >= limit:
                break
        return out

    def commit(self, n: int, generation: int | None = None) -> None:
        """Remove the first n records (the sink wrote them, or they were set aside).

        Crash-safe order: the new position is saved (temp file, fsync, rename) before drained segments are
        unlinked. On a full disk the drained segments are unlinked first, to make room for the position;
        if even that fails the position is kept in memory and saved at the next commit (a restart meanwhile
        replays from the last saved one: at least once). With `generation`: a no-op when records were
        dropped from the front since the batch was taken (the batch is gone already)."""
        if generation is not None and generation != self.generation:
            return
        seg, off = self._head
        drained: list[int] = []
        while n > 0 and self._segments:
            with self._path(seg).open("rb") as f:
                f.seek(off)
                while n > 0 and self._counts.get(seg, 0) > 0:
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
            if self._counts.get(seg, 0) > 0 or seg == self._segments[-1]:
                break
            drained.append(seg)
            self._segments.remove(seg)
            self._counts.pop(seg, None)
            seg, off = self._segments[0], 0
        self._head, self._inflight = (seg, off), None
        if not self._save_head() and drained:
            self._unlink(drained)
            drained = []
            self._save_head()
        self._unlink(drained)
        if self.count == 0:
            self._empty()

    def _empty(self) -> None:
        """Nothing left: the tail segment goes too (the saved head points at its end; a head whose segment
        is gone and has nothing after it means an empty queue)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._unlink(self._segments)
        self._segments, self._counts = [], {}
        self._tail_size, self.bytes, self.count = 0, 0, 0

    def _unlink(self, segments: list[int]) -> None:
        for s in list(segments):
            with contextlib.suppress(OSError):
                self._path(s).unlink(missing_ok=True)

    def _save_head(self) -> bool:
        """Replace `head` durably: temp file, fsync, rename, fsync the directory. False when the disk refuses."""
        seg, off = self._head
        text = f"{seg} {off} {self._inflight}" if self._inflight else f"{seg} {off}"
        data = text.ljust(_HEAD_BYTES - 1).encode() + b"\n"  # fixed size: can be overwritten in place
        tmp = self.directory / "head.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / "head")
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC and self._overwrite_head(data):
                return True
            if not self._head_dirty:
                log.error("spill %s: cannot save the replay position (%s); kept in memory and saved again at the "
                          "next commit (a restart meanwhile replays some measurements again)",
                          self.directory.name, e)
            self._head_dirty = True
            return False
        if self._head_dirty:
            self._head_dirty = False
            log.warning("spill %s: the replay position is saved again", self.directory.name)
        return True

    def _overwrite_head(self, data: bytes) -> bool:
        """The full-disk path: overwrite the existing head's bytes in place (one pwrite of a fixed size, which
        needs no free space; a kill cannot tear one write, and an unreadable head means a replay from the
        oldest segment: at least once)."""
        try:
            fd = os.open(self.directory / "head", os.O_WRONLY)
        except OSError:
            return False
        try:
            if os.pwrite(fd, data, 0) != len(data):
                return False
            os.fsync(fd)
        except OSError:
            return False
        finally:
            os.close(fd)
        if self._head_dirty:
            self._head_dirty = False
            log.warning("spill %s: the replay position is saved again", self.directory.name)
        return True

    def close(self) -> None:
        if self._head_dirty:
            self._save_head()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
