"""The jsonfile sink, the sink task and the fan-out, with real files and real trio channels."""

from __future__ import annotations

import datetime as dt
import decimal
import errno
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from reaper.config.schema import JsonFileSinkConfig
from reaper.measurement import Measurement
from reaper.sinks import FanOut, run_sink, write_with_retry
from reaper.sinks.jsonfile import GATHER_SECONDS, JsonFileSink, encode_measurement
from reaper.sinks.runner import WRITES_PER_GATHER


def measurement(metric: str = "m", **row) -> Measurement:
    return Measurement(source="src", metric=metric, table=metric, epoch_ns=1, rows=({"epoch_ns": 1, **row},),
                       tags={"env": "test"})


def test_values_serialise_as_numbers_and_specials_as_null() -> None:
    m = measurement(
        i=2**62, d=decimal.Decimal("3000"), frac=decimal.Decimal("1.25"), nan=decimal.Decimal("NaN"),
        fnan=float("nan"), finf=float("inf"), huge=decimal.Decimal("1e30"),
        ts=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), span=dt.timedelta(seconds=90.5),
        raw=b"\xde\xad", text="x", none=None, flag=True,
    )
    doc = json.loads(encode_measurement(m))
    assert doc == {"metric": "m", "dbname": "src", "custom_tags": {"env": "test"}, "data": [{
        "epoch_ns": 1, "i": 2**62, "d": 3000, "frac": 1.25, "nan": None, "fnan": None, "finf": None,
        "huge": 10**30, "ts": "2024-01-02T03:04:05+00:00", "span": 90.5, "raw": "dead", "text": "x",
        "none": None, "flag": True,
    }]}
    assert isinstance(doc["data"][0]["d"], int)


def test_storage_name_is_the_metric_written() -> None:
    m = Measurement(source="s", metric="db_size_approx", table="db_size", epoch_ns=1, rows=({"epoch_ns": 1},))
    assert json.loads(encode_measurement(m))["metric"] == "db_size"


async def test_sink_task_writes_everything_queued_before_the_channel_closes(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "out.ndjson"
    sink = JsonFileSink(JsonFileSinkConfig(path=str(path)))
    send, receive = trio.open_memory_channel[Measurement](1000)
    async with trio.open_nursery() as n:
        await n.start(run_sink, sink, receive)
        async with send:
            for i in range(700):
                await send.send(measurement(v=i))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["data"][0]["v"] for line in lines] == list(range(700))


class InlineWriter:
    """The sink's writer thread as a plain call: a test of the gathering's timing runs under trio's MockClock,
    which would jump ahead while a real thread writes."""

    async def call(self, fn: Any, *args: Any, abandon: bool = False) -> Any:
        result = fn(*args)
        await trio.lowlevel.checkpoint()
        return result

    def close(self) -> None:
        pass


async def test_a_burst_is_written_when_it_ends_and_a_busy_trickle_shares_writes(tmp_path: Path,
                                                                                 autojump_clock) -> None:
    """What one burst of work emits (a tick's measurements) is written when the burst ends, with no timer
    of its own (each was one more wake-up per tick); sources that keep emitting a moment apart (a busy
    fleet) get at most WRITES_PER_GATHER writes per gather window, what arrives meanwhile sharing the
    next; a shutdown inside a window still writes what is in hand."""
    path = tmp_path / "out.ndjson"
    sink = JsonFileSink(JsonFileSinkConfig(path=str(path)))
    sink._writer = InlineWriter()  # type: ignore[assignment]  # (the mock clock would jump while a thread writes)
    batches: list[int] = []
    times: list[float] = []
    write = sink.write

    async def counted(batch: list[Measurement]) -> None:
        batches.append(len(batch))
        times.append(trio.current_time())
        await write(batch)

    sink.write = counted  # type: ignore[method-assign]
    send, receive = trio.open_memory_channel[Measurement](100)
    async with trio.open_nursery() as n:
        await n.start(run_sink, sink, receive)
        with trio.fail_after(60):  # the sink opens its file in a worker thread (real time)
            while sink._file is None:
                await trio.sleep(0.001)
        async with send:
            burst = trio.current_time()
            for i in range(5):  # one tick's measurements, emitted between checkpoints
                send.send_nowait(measurement(v=i))
                await trio.lowlevel.checkpoint()
            await trio.sleep(1)
            assert batches == [5]
            assert times == [burst]  # when the burst ended, not GATHER_SECONDS later
            trickle = trio.current_time()
            for i in range(5, 15):  # ten sources' ticks, 20 ms apart
                send.send_nowait(measurement(v=i))
                await trio.sleep(0.02)
            await trio.sleep(1)
            # the burst's write counts in the window; the 4th of the trickle comes after it left the window
            assert batches == [5, 1, 1, 1, 1, 6]
            assert times[1:5] == pytest.approx([trickle + 0.02 * i for i in range(4)])
            assert all(later - earlier >= GATHER_SECONDS - 1e-9
                       for earlier, later in zip(times, times[WRITES_PER_GATHER:], strict=False))
            for i in range(15, 18):  # then the channel closes while it waits
                send.send_nowait(measurement(v=i))
                await trio.sleep(0.01)
    assert [json.loads(line)["data"][0]["v"] for line in path.read_text().splitlines()] == list(range(18))
    assert sum(batches) == 18


async def test_fanout_never_blocks_and_counts_what_a_full_sink_cannot_take(tmp_path: Path, caplog) -> None:
    fast_send, fast_receive = trio.open_memory_channel[Measurement](100)
    slow_send, slow_receive = trio.open_memory_channel[Measurement](3)
    fanout = FanOut()
    fast = fanout.add("fast", fast_send)
    slow = fanout.add("slow", slow_send)
    with caplog.at_level(logging.WARNING):
        for i in range(10):
            fanout.send(measurement(v=i))
    assert (fast.sent, fast.dropped) == (10, 0)
    assert (slow.sent, slow.dropped) == (3, 7)
    assert slow.queued == 3
    full = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(full) == 1 and "slow" in full[0].getMessage()  # logged once per episode
    slow_receive.receive_nowait()
    fanout.send(measurement(v=99))
    assert any("caught up" in r.getMessage() and "7 measurements dropped" in r.getMessage()
               for r in caplog.records)
    fanout.close()
    assert len([m async for m in fast_receive]) == 11


class FullDisk:
    """A file whose every write fails as a full disk does (an outage: retried, not set aside); it stands for
    the file at the sink's path (`fileno`: the sink checks that the path still names its file)."""

    def __init__(self, real: object) -> None:
        self.fileno = real.fileno  # type: ignore[attr-defined]

    def seekable(self) -> bool:
        return False

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


async def test_write_failure_keeps_the_batch_and_retries(tmp_path: Path, caplog) -> None:
    sink = JsonFileSink(JsonFileSinkConfig(path=str(tmp_path / "out.ndjson")))
    await sink.open()
    real_file = sink._file
    sink._file = FullDisk(real_file)  # type: ignore[assignment]

    def failures() -> int:
        return len([r for r in caplog.records if "No space left on device; retrying" in r.getMessage()])

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(write_with_retry, sink, [measurement(v=1)])
            while not failures():
                await trio.sleep(0.01)
            assert sink.written == 0
            sink._file = real_file  # the disk "recovers"; the kept batch is written by the next retry
    await sink.aclose()
    assert json.loads((tmp_path / "out.ndjson").read_text())["data"][0]["v"] == 1
    assert failures() == 1  # one line per failure episode, not one per retry
    assert any("writing again" in r.getMessage() for r in caplog.records)


async def test_rotation_by_size_keeps_the_configured_backups(tmp_path: Path) -> None:
    path = tmp_path / "out.ndjson"
    sink = JsonFileSink(JsonFileSinkConfig(path=str(path), max_bytes=1000, backups=2))
    await sink.open()
    for i in range(60):
        await sink.write([measurement(v=i)])
    await sink.aclose()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["out.ndjson", "out.ndjson.1", "out.ndjson.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    values = [json.loads(line)["data"][0]["v"]
              for name in ("out.ndjson.2", "out.ndjson.1", "out.ndjson")
              for line in (tmp_path / name).read_text().splitlines()]
    assert values == list(range(60 - len(values), 60))  # newest kept, in order, none duplicated


async def test_a_file_moved_away_by_logrotate_or_deleted_is_made_again(tmp_path: Path) -> None:
    """logrotate's default moves the file and expects the writer to make a new one; a deleted file must not
    swallow what follows either."""
    path = tmp_path / "out.ndjson"
    sink = JsonFileSink(JsonFileSinkConfig(path=str(path)))
    await sink.open()
    await sink.write([measurement(v=1)])
    path.rename(tmp_path / "out.ndjson.1")
    await sink.write([measurement(v=2)])
    path.unlink()
    await sink.write([measurement(v=3)])
    await sink.write([measurement(v=4)])
    await sink.aclose()

    def values(name: str) -> list[int]:
        return [json.loads(line)["data"][0]["v"] for line in (tmp_path / name).read_text().splitlines()]
    assert values("out.ndjson.1") == [1]
    assert values("out.ndjson") == [3, 4]
