"""The records of one storage flush, produced for COPY by an asyncio task of their own (asyncio side)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol

Record = tuple[Any, ...]
ENCODE_CHUNK_ROWS = 200  # records produced between two turns of the event loop
ENCODE_CHUNKS_AHEAD = 50  # how far the encoding may run ahead of COPY, in chunks


class HasRecords(Protocol):
    @property
    def records(self) -> Iterable[Record]: ...


class CopyFeed:
    """Produces a flush's records in an asyncio task of their own, a bounded number of chunks ahead.

    The records may be encoded lazily (the sink's JSON encoding). Produced by this task, that work goes on
    whenever COPY waits (for the socket to drain, or for the server to finish the previous table), so the
    Python side and PostgreSQL's parsing overlap on the two cores instead of taking turns. The task yields
    after every chunk, so trio's other tasks get turns during a large flush.
    """

    def __init__(self, tables: Sequence[HasRecords]) -> None:
        self._tables = tables
        self._chunks: list[collections.deque[list[Record]]] = [collections.deque() for _ in tables]
        self._finished = [False] * len(tables)
        self._buffered = 0
        self._progress = asyncio.Event()  # a chunk or an end was produced
        self._room = asyncio.Event()  # the consumer took a chunk
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CopyFeed:
        self._task = asyncio.get_running_loop().create_task(self._produce())
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _produce(self) -> None:
        try:
            for index, table_rows in enumerate(self._tables):
                chunk: list[Record] = []
                for record in table_rows.records:
                    chunk.append(record)
                    if len(chunk) >= ENCODE_CHUNK_ROWS:
                        await self._put(index, chunk)
                        chunk = []
                self._finished[index] = True
                await self._put(index, chunk)
        except Exception as e:  # handed to the COPY waiting for these records, which fails and rolls back
            self._error = e
            self._progress.set()

    async def _put(self, index: int, chunk: list[Record]) -> None:
        self._chunks[index].append(chunk)
        self._buffered += 1
        self._progress.set()
        await asyncio.sleep(0)
        while self._buffered >= ENCODE_CHUNKS_AHEAD:
            self._room.clear()
            await self._room.wait()

    async def records(self, index: int) -> AsyncIterator[Record]:
        """The records of table `index`, as they are produced."""
        chunks = self._chunks[index]
        while True:
            while chunks:
                chunk = chunks.popleft()
                self._buffered -= 1
                self._room.set()
                for record in chunk:
                    yield record
            if self._finished[index] and not chunks:
                return
            if self._error is not None:
                raise self._error
            self._progress.clear()
            await self._progress.wait()
