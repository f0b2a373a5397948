"""The on-disk spill queue and the sink task's use of it (real files, real trio channels)."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.lowlevel

from reaper.config.schema import JsonFileSinkConfig
from reaper.measurement import Measurement
from reaper.sinks import FanOut, run_sink
from reaper.sinks.jsonfile import JsonFileSink
from reaper.sinks.spill import SpillQueue


def m(i: int) -> Measurement:
    return Measurement(source="s", metric="x", table="x", epoch_ns=i, rows=({"epoch_ns": i, "v": i},))


def test_fifo_survives_reopen_and_commit(tmp_path: Path) -> None:
    q = SpillQueue(tmp_path / "q", 10**6)
    q.open()
    for i in range(10):
        q.append(m(i))
    assert [x.epoch_ns for x in q.peek(4)] == [0, 1, 2, 3]
    q.commit(4)
    q.close()
    again = SpillQueue(tmp_path / "q", 10**6)
    again.open()
    assert len(again) == 6
    assert [x.epoch_ns for x in again.peek(100)] == [4, 5, 6, 7, 8, 9]
    again.commit(6)
    assert len(again) == 0 and again.bytes == 0
    assert not list((tmp_path / "q").glob("*.seg"))


def test_torn_last_record_is_cut_off_on_recovery(tmp_path: Path) -> None:
    q = SpillQueue(tmp_path / "q", 10**6)
    q.open()
    for i in range(3):
        q.append(m(i))
    q.close()
    seg = next((tmp_path / "q").glob("*.seg"))
    with seg.open("ab") as f:
        f.write(b"\x00\x00\x01\x00{\"half")  # a record cut short by a kill mid-write
    again = SpillQueue(tmp_path / "q", 10**6)
    again.open()
    assert [x.epoch_ns for x in again.peek(10)] == [0, 1, 2]
    again.append(m(3))
    assert [x.epoch_ns for x in again.peek(10)] == [0, 1, 2, 3]


def test_bound_drops_the_oldest_segment_and_counts_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("reaper.sinks.spill.SEGMENT_BYTES", 1000)
    q = SpillQueue(tmp_path / "q", 3000)
    q.open()
    for i in range(200):
        q.append(m(i))
    assert q.bytes <= 3000
    assert q.dropped > 0 and q.dropped + len(q) == 200
    kept = [x.epoch_ns for x in q.peek(1000)]
    assert kept == list(range(200 - len(kept), 200))  # the newest are kept, in order


def test_values_come_back_as_the_sinks_would_write_them(tmp_path: Path) -> None:
    import datetime as dt
    import decimal

    q = SpillQueue(tmp_path / "q", 10**6)
    q.open()
    q.append(Measurement(source="s", metric="x", table="t", epoch_ns=5, tags={"env": "p"}, rows=(
        {"epoch_ns": 5, "d": decimal.Decimal("2.5"), "ts": dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
         "nan": float("nan")},)))
    (back,) = q.peek(1)
    assert back.rows == ({"epoch_ns": 5, "d": 2.5, "ts": "2024-01-01T00:00:00+00:00", "nan": None},)
    assert (back.source, back.metric, back.table, back.tags) == ("s", "x", "t", {"env": "p"})


class FlakySink(JsonFileSink):
    """A real jsonfile sink whose writes fail while `down` is set (as when its disk is gone)."""

    down = False

    async def write(self, batch):
        if self.down:
            raise OSError("No space left on device")
        await super().write(batch)


def written(path: Path) -> list[int]:
    return [json.loads(line)["data"][0]["v"] for line in path.read_text().splitlines()]


async def test_a_failing_sink_spills_in_order_and_replays_everything(tmp_path: Path) -> None:
    out = tmp_path / "out.ndjson"
    sink = FlakySink(JsonFileSinkConfig(path=str(out)))
    spill = SpillQueue(tmp_path / "spill", 10**7)
    spill.open()
    send, receive = trio.open_memory_channel[Measurement](5)
    fanout = FanOut()
    outlet = fanout.add(sink.label, send, spill)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            await n.start(run_sink, sink, receive, outlet)
            for i in range(10):
                fanout.send(m(i))
                await trio.lowlevel.checkpoint()
            while sink.written < 10:
                await trio.sleep(0.01)
            sink.down = True
            for i in range(10, 60):  # the sink is down: nothing is lost, order is kept
                fanout.send(m(i))
                await trio.lowlevel.checkpoint()
            while not outlet.spilling:
                await trio.sleep(0.01)
            assert outlet.dropped == 0
            sink.down = False  # it comes back: the spill is replayed before anything new
            while outlet.spilling:
                await trio.sleep(0.05)
            for i in range(60, 70):
                fanout.send(m(i))
            fanout.close()
    assert written(out) == list(range(70))
    assert len(spill) == 0 and outlet.spilled > 0 and outlet.dropped == 0


async def test_what_is_spilled_at_shutdown_is_replayed_by_the_next_start(tmp_path: Path) -> None:
    out = tmp_path / "out.ndjson"
    sink = FlakySink(JsonFileSinkConfig(path=str(out)))
    sink.down = True
    spill = SpillQueue(tmp_path / "spill", 10**7)
    spill.open()
    send, receive = trio.open_memory_channel[Measurement](100)
    fanout = FanOut()
    fanout.add(sink.label, send, spill)
    async with trio.open_nursery() as n:
        await n.start(run_sink, sink, receive, fanout.outlets[0])
        for i in range(20):
            fanout.send(m(i))
        with trio.fail_after(10):
            while len(spill) < 20:  # the failed write moved everything queued to disk
                await trio.sleep(0.01)
        n.cancel_scope.cancel()  # the shutdown grace ran out while the sink was down
    assert not out.exists() or out.read_text() == ""
    # next start: a fresh process opens the same spill directory
    spill2 = SpillQueue(tmp_path / "spill", 10**7)
    spill2.open()
    assert len(spill2) == 20
    sink2 = JsonFileSink(JsonFileSinkConfig(path=str(out)))
    send2, receive2 = trio.open_memory_channel[Measurement](100)
    fanout2 = FanOut()
    outlet2 = fanout2.add(sink2.label, send2, spill2)
    assert outlet2.spilling  # new data waits behind what is on disk
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(run_sink, sink2, receive2, outlet2)
            fanout2.send(m(20))
            fanout2.close()
    assert written(out) == list(range(21))
