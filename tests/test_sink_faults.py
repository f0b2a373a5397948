"""A sink that cannot open or write, or that refuses content, never stops anything else (issue 11 Build 3).

Fake sinks with scripted failures drive the sink task (its backoff runs on trio's MockClock); the spill
queue and the rejected/ files are real files under tmp_path.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import asyncpg
import trio
import trio.testing

from reaper.config.schema import JsonFileSinkConfig
from reaper.db.storage import StorageError, StorageRejected, _translate
from reaper.errors import SinkError
from reaper.measurement import Measurement
from reaper.sinks import FanOut, SinkRunner
from reaper.sinks.jsonfile import JsonFileSink
from reaper.sinks.spill import SpillQueue


def m(i: int, **row: object) -> Measurement:
    return Measurement(source="s", metric="x", table="x", epoch_ns=i, rows=({"epoch_ns": i, **row},))


class ScriptedSink:
    """Fails to open while `open_error` is set; refuses (TypeError) measurements whose epoch_ns is in `bad`."""

    def __init__(self) -> None:
        self.label = "scripted"
        self.open_error: Exception | None = None
        self.write_error: Exception | None = None
        self.bad: set[int] = set()
        self.opened = 0
        self.got: list[int] = []
        self.writes = 0

    async def open(self, beside: trio.Nursery | None = None) -> None:
        if self.open_error is not None:
            raise self.open_error
        self.opened += 1

    async def write(self, batch: list[Measurement]) -> None:
        self.writes += 1
        if self.write_error is not None:
            raise self.write_error
        if any(x.epoch_ns in self.bad for x in batch):
            raise TypeError("Type is not JSON serializable: Widget")
        self.got.extend(x.epoch_ns for x in batch)

    async def aclose(self) -> None:
        pass


def spill_in(tmp_path: Path) -> SpillQueue:
    q = SpillQueue(tmp_path / "state" / "spill" / "scripted-0", 10**7)
    q.open()
    return q


async def wait_for(predicate, what: str) -> None:
    with trio.fail_after(600):  # MockClock time: the backoff is at most 30 s per round
        while not predicate():
            await trio.sleep(0.05)


async def test_a_sink_that_cannot_open_reports_started_spills_and_catches_up(tmp_path: Path, caplog,
                                                                            autojump_clock) -> None:
    sink = ScriptedSink()
    sink.open_error = SinkError("cannot open /proc/x.ndjson: No such file or directory")
    fanout = FanOut()
    send, receive = trio.open_memory_channel[Measurement](10)
    outlet = fanout.add(sink.label, send, spill=spill_in(tmp_path))
    async with trio.open_nursery() as n:
        with trio.fail_after(1):
            await n.start(SinkRunner(sink, receive, outlet).run)  # started although open fails
        for i in range(50):
            fanout.send(m(i))
            await trio.sleep(1)
        assert sink.opened == 0 and outlet.spilled == 50 and outlet.dropped == 0
        assert outlet.error == "cannot open /proc/x.ndjson: No such file or directory"
        lines = [r.getMessage() for r in caplog.records if "cannot open" in r.getMessage()]
        assert lines == ["sink scripted: cannot open /proc/x.ndjson: No such file or directory; retrying every 30s "
                         "at most, measurements spill meanwhile"]  # one line, not one per retry
        sink.open_error = None
        await wait_for(lambda: len(sink.got) == 50, "the spill replayed")
        assert outlet.error is None
        fanout.send(m(50))
        await wait_for(lambda: len(sink.got) == 51, "a direct write")
        fanout.close()
    assert sink.got == list(range(51))
    assert any("writing again" in r.getMessage() for r in caplog.records)


async def test_a_sink_without_spill_that_cannot_open_keeps_the_newest_and_never_holds_up_a_stop(
        caplog, autojump_clock) -> None:
    """A sink without a spill queue (the Prometheus sink) that cannot open: what arrives meanwhile is kept up
    to its queue's capacity, the oldest dropped and counted (it wants the latest values), and delivered once
    it opens; closing its channel while it still cannot open ends its task at once."""
    sink = ScriptedSink()
    sink.open_error = SinkError("cannot listen on '127.0.0.1:9187': Address already in use")
    fanout = FanOut()
    send, receive = trio.open_memory_channel[Measurement](10)
    outlet = fanout.add(sink.label, send)
    async with trio.open_nursery() as n:
        await n.start(SinkRunner(sink, receive, outlet).run)
        for i in range(25):
            fanout.send(m(i))
            await trio.sleep(0.01)
        assert outlet.dropped == 15 and outlet.error is not None
        assert sum("dropping the oldest" in r.getMessage() for r in caplog.records) == 1
        sink.open_error = None
        await wait_for(lambda: len(sink.got) == 10, "the newest delivered")
        fanout.close()
    assert sink.got == list(range(15, 25))
    sink = ScriptedSink()
    sink.open_error = SinkError("cannot listen")
    send, receive = trio.open_memory_channel[Measurement](10)
    outlet = FanOut().add(sink.label, send)
    with trio.fail_after(1):
        async with trio.open_nursery() as n:
            await n.start(SinkRunner(sink, receive, outlet).run)
            outlet.put(m(1))
            await trio.sleep(0.1)
            send.close()  # the daemon's shutdown
    assert sink.opened == 0


async def test_a_new_reason_is_logged_again(tmp_path: Path, caplog, autojump_clock) -> None:
    sink = ScriptedSink()
    sink.open_error = SinkError("cannot open /x: No such file or directory")
    send, receive = trio.open_memory_channel[Measurement](10)
    outlet = FanOut().add(sink.label, send, spill=spill_in(tmp_path))
    async with trio.open_nursery() as n:
        await n.start(SinkRunner(sink, receive, outlet).run)
        await trio.sleep(100)
        sink.open_error = SinkError("cannot open /x: Permission denied")
        await trio.sleep(100)
        send.close()
    lines = [r.getMessage() for r in caplog.records if "cannot open" in r.getMessage()]
    assert len(lines) == 2 and "No such file" in lines[0] and "Permission denied" in lines[1]


async def test_a_refused_measurement_is_set_aside_and_the_rest_is_delivered(tmp_path: Path, caplog,
                                                                          autojump_clock) -> None:
    sink = ScriptedSink()
    sink.bad = {7, 300}
    send, receive = trio.open_memory_channel[Measurement](1000)
    outlet = FanOut().add(sink.label, send, spill=spill_in(tmp_path))
    runner = SinkRunner(sink, receive, outlet)
    for i in range(400):
        send.send_nowait(m(i))
    send.close()
    with trio.fail_after(60):
        await runner.run()
    assert sink.got == [i for i in range(400) if i not in (7, 300)]  # in order, nothing else lost
    assert outlet.rejected == 2 and outlet.dropped == 0
    files = list((tmp_path / "state" / "rejected" / "scripted-0").glob("*.ndjson"))
    docs = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(d["epoch_ns"] for d in docs) == [7, 300]
    assert all(d["error"] == "TypeError: Type is not JSON serializable: Widget" and d["sink"] == "scripted"
               for d in docs)
    assert docs[0]["rows"] == [{"epoch_ns": docs[0]["epoch_ns"]}]
    traced = [r for r in caplog.records if r.exc_info]
    assert len(traced) == 1  # the traceback once, then one line per rejection
    assert sum("cannot store measurement" in r.getMessage() for r in caplog.records) == 2


async def test_a_refused_measurement_in_the_spill_does_not_block_the_replay(tmp_path: Path,
                                                                          autojump_clock) -> None:
    spill = spill_in(tmp_path)
    for i in range(30):
        spill.append(m(i))
    sink = ScriptedSink()
    sink.bad = {3}
    send, receive = trio.open_memory_channel[Measurement](10)
    outlet = FanOut().add(sink.label, send, spill=spill)
    send.close()
    with trio.fail_after(60):
        await SinkRunner(sink, receive, outlet).run()
    assert sink.got == [i for i in range(30) if i != 3] and outlet.rejected == 1
    again = SpillQueue(spill.directory, 10**7)
    again.open()
    assert len(again) == 0


async def test_an_outage_is_retried_not_rejected(tmp_path: Path, autojump_clock) -> None:
    sink = ScriptedSink()
    sink.write_error = OSError(errno.ECONNREFUSED, "Connection refused")
    send, receive = trio.open_memory_channel[Measurement](10)
    outlet = FanOut().add(sink.label, send, spill=spill_in(tmp_path))
    async with trio.open_nursery() as n:
        await n.start(SinkRunner(sink, receive, outlet).run)
        for i in range(5):
            outlet.put(m(i))
            await trio.sleep(1)
        await trio.sleep(120)
        assert sink.got == [] and outlet.rejected == 0 and outlet.error == "[Errno 111] Connection refused"
        sink.write_error = None
        await wait_for(lambda: len(sink.got) == 5, "the outage is over")
        send.close()
    assert sink.got == list(range(5))


async def test_jsonfile_value_the_encoder_rejects_lands_in_rejected(tmp_path: Path) -> None:
    nested: list[object] = []
    for _ in range(600):  # deeper than any JSON encoder goes
        nested = [nested]
    sink = JsonFileSink(JsonFileSinkConfig(path=str(tmp_path / "out.ndjson")))
    send, receive = trio.open_memory_channel[Measurement](10)
    outlet = FanOut().add(sink.label, send, spill=spill_in(tmp_path))
    send.send_nowait(m(1, v=1))
    send.send_nowait(m(2, v=nested))
    send.send_nowait(m(3, v=3))
    send.close()
    with trio.fail_after(20):
        await SinkRunner(sink, receive, outlet).run()
    written = [json.loads(line)["data"][0]["epoch_ns"] for line in (tmp_path / "out.ndjson").read_text().splitlines()]
    assert written == [1, 3] and outlet.rejected == 1
    rejected = next((tmp_path / "state" / "rejected").rglob("*.ndjson")).read_text()
    doc = json.loads(rejected)
    assert doc["epoch_ns"] == 2 and doc["error"]  # the encoder's own error (orjson's, or a RecursionError)


def test_a_storage_data_exception_is_a_rejection_and_a_lost_connection_an_outage() -> None:
    assert isinstance(_translate(asyncpg.CharacterNotInRepertoireError(
        'invalid byte sequence for encoding "UTF8": 0x00')), StorageRejected)
    assert isinstance(_translate(asyncpg.DivisionByZeroError("division by zero")), StorageRejected)
    outage = _translate(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert isinstance(outage, StorageError) and isinstance(outage, OSError)
