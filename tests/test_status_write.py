"""When the status file is written (reaper.daemon.statuswrite), in process, no server: what the change
fingerprint counts as a change and what it does not, that the writer writes on a change, on request and
on the heartbeat only (under MockClock, writes counted), and that its chunked build is the document of
before (`unstructure(Daemon.status())`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing

from reaper.config.load import load_config
from reaper.daemon import statuswrite
from reaper.daemon.app import Daemon
from reaper.daemon.lanes import LaneState
from reaper.daemon.reconciler import RunningSource
from reaper.daemon.status import STATUS_FILE, STATUS_HEARTBEAT_SECONDS, read_status_file, unstructure
from reaper.daemon.statuswrite import STATUS_CHECK_SECONDS, status_fingerprint
from reaper.measurement import Measurement


class FakeLane:
    def __init__(self, name: str) -> None:
        self.state = LaneState(name=name, connected=True, runs=3, statements_last_run=1, statements_total=3)


def make_daemon(tmp_path: Path, sources: int = 3) -> Daemon:
    lines = ["[collector]", f'state_dir = "{tmp_path / "state"}"', "",
             "[[sinks]]", 'type = "jsonfile"', f'path = "{tmp_path / "out.ndjson"}"', ""]
    for i in range(sources):
        lines += ["[[sources]]", f'name = "s{i}"', f'dsn = "postgresql://reaper@127.0.0.1:1/db{i}"',
                  'preset = "basic"', ""]
    (tmp_path / "reaper.toml").write_text("\n".join(lines))
    daemon = Daemon(load_config(tmp_path / "reaper.toml"))
    for config in daemon.config.sources:
        reaper = daemon._make_source(config, daemon.catalog)
        st = reaper.state
        st.status, st.server_version, st.in_recovery = "up", "15.4", False
        reaper.cost.effective(reaper.active_intervals())
        reaper.slow, reaper.local = FakeLane("slow"), FakeLane("local")  # type: ignore[assignment]
        daemon.reconciler.sources[config.name] = RunningSource(config, daemon.catalog, reaper, trio.CancelScope(),
                                                               trio.Event())
    send, _ = trio.open_memory_channel[Measurement](10)
    daemon.fanout.add("jsonfile", send)
    return daemon


def _counters(d: Daemon) -> None:
    st = d.sources["s1"].reaper.state
    st.ticks, st.rows, st.measurements, st.statements_total = st.ticks + 7, st.rows + 500, st.measurements + 9, 40
    st.last_tick_wall, st.next_tick = 1.7e9, 12.0
    for lateness in (0.001, 0.2, 0.003):
        st.lateness.append(lateness)
    st.metric_rows["db_stats"] = 12
    d.sources["s1"].reaper.cost.record("db_stats", 1.0, 0.05, [{"a": 1}])
    d.sources["s1"].reaper.slow.state.runs += 5  # type: ignore[union-attr]
    outlet = d.fanout.outlets[0]
    outlet.sent += 100
    outlet.channel.send_nowait(Measurement("s1", "db_stats", "db_stats", 1, []))  # queued


CHANGES: dict[str, Callable[[Daemon], Any]] = {
    "a source goes down": lambda d: setattr(d.sources["s1"].reaper.state, "status", "down"),
    "a source's last error": lambda d: setattr(d.sources["s1"].reaper.state, "last_error", "connection refused"),
    "a metric degraded": lambda d: d.sources["s2"].reaper.state.degraded.add("wal"),
    "a metric too slow for the batch": lambda d: d.sources["s2"].reaper.state.slow.add("wal"),
    "a promotion": lambda d: setattr(d.sources["s0"].reaper.state, "in_recovery", True),
    "a server upgrade": lambda d: setattr(d.sources["s0"].reaper.state, "server_version", "16.1"),
    "the slow lane disconnected": lambda d: setattr(d.sources["s0"].reaper.slow.state, "connected", False),
    "a stretched interval": lambda d: d.sources["s0"].reaper.cost.factors.update(db_stats=2),
    "heavy metrics paused": lambda d: setattr(d.sources["s0"].reaper.cost, "heavy_paused", True),
    "a source removed": lambda d: d.reconciler.sources.pop("s2"),
    "a sink error": lambda d: setattr(d.fanout.outlets[0], "error", "cannot open out.ndjson"),
    "a sink spilling": lambda d: setattr(d.fanout.outlets[0], "spilling", True),
    "a sink dropping": lambda d: setattr(d.fanout.outlets[0], "lost", 1),
    "a sink rejecting": lambda d: setattr(d.fanout.outlets[0], "rejected", 1),
    "a reload": lambda d: setattr(d, "reloads", 1),
    "a refused reload": lambda d: setattr(d, "reload_failures", 1),
    "a new running plan": lambda d: (setattr(d.reconciler, "_described", None), setattr(d.reconciler, "salt", "x")),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_what_an_operator_acts_on_changes_the_fingerprint(tmp_path: Path, change: str) -> None:
    async def main() -> None:
        daemon = make_daemon(tmp_path)
        before = status_fingerprint(daemon)
        CHANGES[change](daemon)
        assert status_fingerprint(daemon) != before

    trio.run(main)


def test_counters_and_time_do_not_change_the_fingerprint(tmp_path: Path) -> None:
    async def main() -> None:
        daemon = make_daemon(tmp_path)
        before = status_fingerprint(daemon)
        _counters(daemon)
        await trio.sleep(5)
        assert status_fingerprint(daemon) == before
        daemon.sources["s1"].reaper.state.degraded.update({"wal", "db_stats"})  # a set: its order does not count
        after = status_fingerprint(daemon)
        daemon.sources["s1"].reaper.state.degraded.clear()
        daemon.sources["s1"].reaper.state.degraded.update({"db_stats", "wal"})
        assert status_fingerprint(daemon) == after

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_writer_writes_on_change_on_request_and_on_the_heartbeat_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / STATUS_FILE

    async def main() -> None:
        daemon = make_daemon(tmp_path)
        writer = daemon.status_writer
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.sleep(1)
            assert writer.writes == 1  # at start
            inode = path.stat().st_ino
            for _ in range(10):  # ten ticks' checks, only counters moving
                _counters(daemon)
                daemon.controls.worked()  # a source's tick is done
                await trio.sleep(1)
            assert writer.writes == 1 and path.stat().st_ino == inode
            daemon.sources["s1"].reaper.state.status = "down"
            daemon.controls.worked()
            await trio.sleep(0.1)
            assert writer.writes == 2  # at once after the tick that saw it
            assert read_status_file(path).sources[1].status == "down"
            daemon.sources["s2"].reaper.state.status = "down"  # a change no tick or lane run announces
            await trio.sleep(STATUS_CHECK_SECONDS)
            assert writer.writes == 3  # within one unprompted check
            writer.request()  # SIGUSR2
            await trio.sleep(0.01)
            assert writer.writes == 4
            assert read_status_file(path).sources[1].ticks == 70  # the latest counters
            await trio.sleep(STATUS_HEARTBEAT_SECONDS - STATUS_CHECK_SECONDS)
            assert writer.writes == 4
            await trio.sleep(2 * STATUS_CHECK_SECONDS)
            assert writer.writes == 5  # the heartbeat
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_chunked_build_is_the_document_of_daemon_status(tmp_path: Path) -> None:
    async def main() -> None:
        daemon = make_daemon(tmp_path, sources=120)  # more than one chunk
        _counters(daemon)
        daemon.sources["s1"].reaper.state.degraded.add("wal")
        built = await daemon.status_writer.build()
        whole = unstructure(daemon.status())
        assert list(built) == list(whole)  # the same fields, in the same order
        for doc in (built, whole):
            doc["updated_wall"] = 0.0
        assert built == whole
        assert [s["name"] for s in built["sources"]] == sorted(f"s{i}" for i in range(120))
        await daemon.status_writer.write()
        path = daemon.state_dir / STATUS_FILE
        assert orjson.loads(path.read_bytes())["sources"] == built["sources"]
        assert read_status_file(path).running == daemon.reconciler.running_state()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_running_plan_document_is_reused_until_the_plan_changes(tmp_path: Path) -> None:
    async def main() -> None:
        daemon = make_daemon(tmp_path)
        first = (await daemon.status_writer.build())["running"]
        assert (await daemon.status_writer.build())["running"] is first
        daemon.reconciler._described = None  # the reconciler describes it again after a change
        daemon.reconciler.salt = "another"
        again = (await daemon.status_writer.build())["running"]
        assert again is not first and again["salt"] == "another"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_build_has_every_field_of_source_status(tmp_path: Path) -> None:
    """The build's source documents are SourceReaper.status() unstructured: every field of SourceStatus."""
    async def main() -> None:
        daemon = make_daemon(tmp_path, sources=1)
        built = await daemon.status_writer.build()
        fields = [f.name for f in attrs.fields(type(daemon.sources["s0"].reaper.status()))]
        assert list(built["sources"][0]) == fields

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The trio times of the writer's checks (each computes the status fingerprint once)."""
    checks: list[float] = []
    real = statuswrite.status_fingerprint

    def counted(daemon: Any, keys: Any = None) -> Any:
        checks.append(trio.current_time())
        return real(daemon, keys)

    monkeypatch.setattr(statuswrite, "status_fingerprint", counted)
    return checks


def test_a_small_fleet_is_checked_when_each_burst_of_work_ends_with_no_timer_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below SPACED_FROM_SOURCES, a tick's pokes are checked once its burst of work has ended, in the same
    moment: a check on a timer a moment later (the 30 ms spacing of 6 sources) was one more wake-up of the
    process per tick, and wake-ups are most of an idle daemon's CPU."""
    checks = _count_checks(monkeypatch)

    async def main() -> None:
        daemon = make_daemon(tmp_path, sources=6)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.status_writer.run)
            await trio.sleep(1)
            bursts = []
            for _ in range(3):  # a tick: its lanes poke a few milliseconds apart
                for _ in range(2):
                    bursts.append(trio.current_time())
                    for _ in range(4):  # a burst of work that pokes, then goes on a little
                        daemon.controls.worked()
                        await trio.lowlevel.checkpoint()
                    await trio.sleep(0.004)
                await trio.sleep(5)
            nursery.cancel_scope.cancel()
        assert checks[1:] == bursts  # one check per burst, at its end, none in between or after

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_writer_checks_after_work_spaced_for_the_fleet_and_else_only_every_check_period(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No clock of its own below STATUS_CHECK_SECONDS (an idle daemon's wake-ups cost more than their work):
    an idle minute holds one check per STATUS_CHECK_SECONDS; ticks poking 100 times a second in a 150-source
    fleet (spacing 0.75 s; written in the trio thread, as below THREAD_FROM_SOURCES) are checked 6-7 times in 5 s."""
    checks = _count_checks(monkeypatch)

    async def main() -> None:
        daemon = make_daemon(tmp_path, sources=150)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.status_writer.run)
            await trio.sleep(59)
            idle = len(checks)
            for _ in range(500):  # 5 s of ticks
                daemon.controls.worked()
                await trio.sleep(0.01)
            busy = len(checks) - idle
            nursery.cancel_scope.cancel()
        assert idle == 1 + 59 // STATUS_CHECK_SECONDS  # at start, then one per check period
        assert 6 <= busy <= 8, checks

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_check_after_work_reads_only_the_sources_that_worked_and_an_unprompted_one_reads_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet's check after a burst reads the sources that announced work (FleetControls.worked(name)), not
    all of them; a change in a source that announced nothing is still written within one unprompted check."""
    path = tmp_path / "state" / STATUS_FILE
    read: list[str] = []
    real = statuswrite._source_key

    def counted(running: RunningSource) -> Any:
        read.append(running.config.name)
        return real(running)

    monkeypatch.setattr(statuswrite, "_source_key", counted)

    async def main() -> None:
        daemon = make_daemon(tmp_path, sources=20)
        writer = daemon.status_writer
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.sleep(1)
            assert sorted(read) == sorted(daemon.sources) and writer.writes == 1  # at start: every source
            read.clear()
            daemon.sources["s3"].reaper.state.status = "down"
            daemon.controls.worked("s3")  # s3's tick is done
            daemon.controls.worked("s4")
            await trio.sleep(0.1)
            assert sorted(read) == ["s3", "s4"]
            assert writer.writes == 2
            assert next(s for s in read_status_file(path).sources if s.name == "s3").status == "down"
            read.clear()
            daemon.sources["s7"].reaper.state.last_error = "connection refused"  # announced by no work
            daemon.controls.worked("s5")
            await trio.sleep(0.1)
            assert read == ["s5"] and writer.writes == 2  # not seen yet: s7 did not work
            read.clear()
            await trio.sleep(STATUS_CHECK_SECONDS)
            assert sorted(read) == sorted(daemon.sources)  # the unprompted check reads every source
            assert writer.writes == 3
            assert next(s for s in read_status_file(path).sources if s.name == "s7").last_error == "connection refused"
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_large_fleets_spaced_check_waits_for_work_not_for_a_timer_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From SPACED_FROM_SOURCES sources on, a poke within the spacing is checked at the first poke after the
    spacing has passed (the process is awake then), or at the next unprompted check: a timer at the spacing's
    end woke an otherwise idle process once more after most grid instants of a 100-source fleet."""
    checks = _count_checks(monkeypatch)

    async def main() -> None:
        daemon = make_daemon(tmp_path, sources=150)  # spacing 0.75 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.status_writer.run)
            await trio.sleep(1)
            start = len(checks)
            daemon.controls.worked("s0")  # a tick: checked when its burst ends
            await trio.sleep(0.1)
            daemon.controls.worked("s1")  # within the spacing: waits for more work
            await trio.sleep(4)
            daemon.controls.worked("s2")  # the next grid instant's work: the waiting check comes with it
            await trio.sleep(0.1)
            daemon.controls.worked("s0")  # within the spacing, then nothing more: the next unprompted check
            await trio.sleep(STATUS_CHECK_SECONDS + 1)
            nursery.cancel_scope.cancel()
        assert checks[start:] == [1.0, 5.1, pytest.approx(5.1 + STATUS_CHECK_SECONDS)], checks

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
