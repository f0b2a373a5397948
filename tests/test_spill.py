"""The on-disk spill queue and the sink task's use of it (real files, real trio channels)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from reaper.config.schema import JsonFileSinkConfig
from reaper.measurement import Measurement
from reaper.sinks import FanOut, run_sink
from reaper.sinks.jsonfile import JsonFileSink
from reaper.sinks.spill import SpillQueue


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (a real full disk); skipped where mounting is not permitted."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


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


# -- faults (issue 12 items 1 and 2) ------------------------------------------------------------------


def test_a_head_whose_segment_is_gone_moves_to_the_oldest_segment_left(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("reaper.sinks.spill.SEGMENT_BYTES", 1000)
    q = SpillQueue(tmp_path / "q", 10**6)
    q.open()
    for i in range(40):
        q.append(m(i))
    q.close()
    segments = sorted((tmp_path / "q").glob("*.seg"))
    assert len(segments) >= 3
    probe = SpillQueue(tmp_path / "q", 10**6)
    probe.open()
    first_left = [x.epoch_ns for x in probe.peek(1000) if x.epoch_ns >= 0]
    probe.close()
    gone = probe._counts[int(segments[0].stem)]
    first_left = first_left[gone:]
    (tmp_path / "q" / "head").write_text(f"{int(segments[0].stem)} 77\n")  # the state issue 12 found
    segments[0].unlink()
    again = SpillQueue(tmp_path / "q", 10**6)
    again.open()  # no FileNotFoundError
    assert [x.epoch_ns for x in again.peek(1000)][: len(first_left)] == first_left


def test_the_batch_in_flight_at_a_kill_is_taken_again_whole(tmp_path: Path) -> None:
    q = SpillQueue(tmp_path / "q", 10**6)
    q.open()
    for i in range(10):
        q.append(m(i))
    assert [x.epoch_ns for x in q.take(4) if x] == [0, 1, 2, 3]
    for i in range(10, 20):  # more arrives while the batch is written; then a SIGKILL (no commit, no close)
        q.append(m(i))
    again = SpillQueue(tmp_path / "q", 10**6)
    again.open()
    assert [x.epoch_ns for x in again.take(100) if x] == [0, 1, 2, 3]  # the same batch: same fingerprint
    again.commit(4)
    assert [x.epoch_ns for x in again.take(100) if x] == list(range(4, 20))


def test_commit_saves_the_position_before_unlinking_drained_segments(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("reaper.sinks.spill.SEGMENT_BYTES", 1000)
    q = SpillQueue(tmp_path / "q", 10**6)
    q.open()
    for i in range(40):
        q.append(m(i))
    order: list[str] = []
    real_replace, real_unlink = os.replace, Path.unlink
    monkeypatch.setattr("reaper.sinks.spill.os.replace", lambda a, b: (order.append("head"), real_replace(a, b)))
    monkeypatch.setattr(Path, "unlink", lambda self, **kw: (order.append(self.suffix), real_unlink(self, **kw)))
    q.commit(len(q.take(25)))
    assert order[0] == "head" and ".seg" in order


def test_a_full_disk_drops_counted_and_replay_commits_without_free_space(tmp_path: Path, tmpfs) -> None:
    """ENOSPC on a real 2 MB tmpfs: appends fail cleanly (no torn record), counted as dropped; the sink
    drains the queue while the disk is still full; a reopen finds exactly what was not committed."""
    send, _receive = trio.open_memory_channel[Measurement](0)
    spill = SpillQueue(tmpfs / "spill", 10**9)
    spill.open()
    outlet = FanOut().add("full", send, spill=spill)
    big = "x" * 3000
    i = 0
    while outlet.dropped < 50:
        outlet.to_spill(Measurement(source="s", metric="x", table="x", epoch_ns=i, rows=({"epoch_ns": i, "v": big},)))
        i += 1
        assert i < 5000, "the tmpfs never filled up"
    kept = len(spill)
    assert kept > 100 and outlet.lost == 50 and outlet.dropped == 50 and kept + 50 == i
    taken = spill.take(100)  # the disk is full: recording the batch in flight may fail, never raises
    spill.commit(len(taken))
    assert len(spill) == kept - 100
    spill.close()
    again = SpillQueue(tmpfs / "spill", 10**9)
    again.open()
    assert again.dropped == 0  # no torn record was left behind
    assert [x.epoch_ns for x in again.peek(10**6)] == list(range(100, kept))
    while len(again):
        again.commit(len(again.take(500)))
    assert not list((tmpfs / "spill").glob("*.seg"))
