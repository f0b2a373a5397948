"""Memory and allocation bounds (issue 14 Build 3), counted, not timed.

- A source connection reads its socket at most RECV_BYTES at a time (asyncio's default, 256 KiB per recv,
  was most of a tick's allocation), and a result many times that size still arrives whole.
- Its statement cache is bounded by STATEMENT_CACHE_SIZE, which holds with margin the distinct
  combined statements every shipped preset produces.
- The lateness history is a fixed ring: the last LATENESS_SAMPLES ticks, oldest first.
- The glibc tuning applies on glibc and never raises.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from reaper import db
from reaper.catalog.metrics import load_shipped_definitions
from reaper.daemon import memory
from reaper.daemon.sourcestate import LATENESS_SAMPLES, Recent, SourceState


@pytest.mark.pg
async def test_a_source_connection_reads_small_chunks_and_bounds_its_statement_cache(pg15: Any, fresh_db: str) -> None:
    async with db.open_loop():
        conn = await db.open_source_connection(pg15.dsn(dbname=fresh_db), statement_timeout_seconds=10)
        try:
            raw = conn._conn
            assert raw._transport.max_size == db.RECV_BYTES < 256 * 1024
            assert raw._stmt_cache.get_max_size() == db.STATEMENT_CACHE_SIZE
            assert raw._stmt_cache.get_max_lifetime() == 0  # kept for the connection's life: no timer, no re-prepare
            assert await conn.fetch("select current_setting('plan_cache_mode') as m") == [{"m": "force_generic_plan"}]
            # ~1.2 MB of rows: many reads of RECV_BYTES each, every row intact
            rows = await conn.fetch("select g, repeat('x', 1000) as pad from generate_series(1, 1200) g")
            assert [r["g"] for r in rows] == list(range(1, 1201))
            assert all(r["pad"] == "x" * 1000 for r in rows)
        finally:
            await conn.close()


@pytest.mark.pg
async def test_a_source_connection_shares_its_empty_listener_sets_and_still_works_and_closes(
        pg15: Any, fresh_db: str) -> None:
    """conntune.slim: the three listener sets are one shared empty set, the writing_allowed event waits on a
    list; a statement far over the socket's send buffer (the event cleared and set again) and a close
    (which clears the sets) work as before, on a connection that has them and on one that does not."""
    from reaper.db.conntune import NO_CALLBACKS, UNUSED_LISTENERS

    async with db.open_loop():
        conns = [await db.open_source_connection(pg15.dsn(dbname=fresh_db), statement_timeout_seconds=10)
                 for _ in range(2)]
        raws = [c._conn for c in conns]
        assert all(getattr(raw, name) is NO_CALLBACKS for raw in raws for name in UNUSED_LISTENERS)
        assert all(type(raw._protocol.writing_allowed._waiters) is list for raw in raws)
        big = "x" * (8 * 1024 * 1024)  # far over the transport's high-water mark: writing pauses and resumes
        assert await conns[0].fetch("select length($1::text) as n", big) == [{"n": len(big)}]
        with pytest.raises(RuntimeError, match="register no listener"):
            raws[1].add_log_listener(lambda *a: None)
        for conn in conns:
            await conn.close()
        assert all(raw.is_closed() for raw in raws) and not NO_CALLBACKS


def test_the_statement_cache_holds_what_every_shipped_preset_can_cache_with_margin() -> None:
    """One combined statement per distinct set of due metrics (the fixed grid repeats every LCM of the
    intervals; a week of it for presets with daily-ish intervals); reaper lets asyncpg cache them whatever
    their size. A few entries stay free for timed groups, degraded metrics, specials."""
    defs = load_shipped_definitions()
    for name, preset in defs.presets.items():
        intervals = dict(preset.metrics)
        batched = {m for m in intervals
                   if not defs.metrics[m].special and not defs.metrics[m].statement_timeout_seconds}
        if not batched:
            continue
        tick = functools.reduce(math.gcd, intervals.values())
        period = min(functools.reduce(math.lcm, intervals.values()), 7 * 86400)
        due_sets = {frozenset(m for m in batched if (k * tick) % intervals[m] == 0) for k in range(period // tick)}
        distinct = len(due_sets - {frozenset()})
        assert distinct + 4 <= db.STATEMENT_CACHE_SIZE, (name, distinct)


def test_lateness_keeps_the_last_samples_oldest_first() -> None:
    ring = Recent(4)
    assert len(ring) == 0 and list(ring) == []
    for v in (1.0, 2.0, 3.0):
        ring.append(v)
    assert list(ring) == [1.0, 2.0, 3.0] and len(ring) == 3
    for v in (4.0, 5.0, 6.0):
        ring.append(v)
    assert list(ring) == [3.0, 4.0, 5.0, 6.0] and len(ring) == 4
    assert sorted(ring)[-1] == max(ring) == 6.0
    state = SourceState("s")
    for i in range(LATENESS_SAMPLES + 10):
        state.lateness.append(float(i))
    assert len(state.lateness) == LATENESS_SAMPLES
    assert next(iter(state.lateness)) == 10.0  # the oldest ones went


def test_lateness_keeps_three_significant_digits_and_a_huge_value() -> None:
    ring = Recent(8)
    for v in (0.0123456, 1.2345, 30.5, 1e9, 0.0):
        ring.append(v)
    back = list(ring)
    assert abs(back[0] - 0.0123456) / 0.0123456 < 1e-3 and abs(back[1] - 1.2345) / 1.2345 < 1e-3
    assert back[2] == 30.5 and back[3] == 65504.0 and back[4] == 0.0  # a lateness past 18 h reads as 18.2 h


def test_state_objects_have_no_instance_dict() -> None:
    assert not hasattr(SourceState("s"), "__dict__")
    assert not hasattr(Recent(), "__dict__")
    assert sys.getsizeof(Recent(LATENESS_SAMPLES)._values) <= 2 * LATENESS_SAMPLES + 100  # 2 bytes a sample


@pytest.mark.skipif(not hasattr(os, "confstr") or "CS_GNU_LIBC_VERSION" not in os.confstr_names,
                    reason="glibc only")
def test_malloc_tuning_applies_on_glibc() -> None:
    if not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("not glibc")
    assert memory.tune()
    blocks = [bytearray(300_000) for _ in range(20)]  # mmapped now (over MMAP_THRESHOLD)
    del blocks
    memory.trim()  # returns whether it released anything; it must simply work


def test_the_housekeeper_trims_at_checks_once_per_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """The status writer's checks (after each burst of work, and at least every check period) are the
    housekeeper's only moments: one trim per TRIM_SECONDS, in the moment of a check, none on its own."""
    calls: list[float] = []

    def counting() -> bool:
        calls.append(trio.current_time())
        return True

    monkeypatch.setattr(memory, "trim", counting)
    keeper = memory.Housekeeper(memory.GcSettler())
    checks: list[float] = []

    async def main() -> None:
        keeper.after_check()  # the writer's first check, at start
        await trio.sleep(memory.TRIM_SECONDS * 4)  # nothing checked: nothing trimmed
        assert calls == []
        for _ in range(10):  # checks every 10 s
            checks.append(trio.current_time())
            keeper.after_check()
            await trio.sleep(10)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(calls) == 4 and keeper.trims == 4  # the first check (the idle time counted), then one per 30 s
    assert set(calls) <= set(checks)


async def test_the_status_writer_calls_the_housekeeper_after_each_check(tmp_path: Path, autojump_clock: Any) -> None:
    from test_status_write import make_daemon

    daemon = make_daemon(tmp_path, sources=2)
    called: list[float] = []
    daemon.status_writer.after_check = lambda: called.append(trio.current_time())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.status_writer.run)
        await trio.sleep(1)
        daemon.controls.worked("s0")  # a tick: the writer checks when its burst ends
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(called) == 2  # at start, after the tick


def test_generated_method_sources_are_forgotten() -> None:
    import linecache

    import attrs

    @attrs.define
    class Made:
        x: int

    assert any(name.startswith("<attrs generated") for name in linecache.cache)
    assert memory.forget_generated_sources() >= 1
    assert not any(name.startswith(memory.GENERATED) for name in linecache.cache)
    assert Made(1) == Made(1) and Made(2).x == 2  # the generated methods still work


def test_the_cost_meter_keeps_a_run_in_32_bytes_and_reads_it_back_exactly() -> None:
    """A run of a metric (when, server seconds, rows, bytes) is four doubles in one array per metric, not a
    tuple or four number objects (~1.2 KB less per source in a fleet); rows and bytes come back exact."""
    import tracemalloc

    from reaper.daemon.cost import Run, SourceCost

    cost = SourceCost("s")
    rows = [{"a": 1, "b": "x"}] * 300  # more rows than the interpreter's cached small ints
    cost.record("m", 100.0, 0.5, rows)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1, 1001):  # all within the window: none pruned
            cost.record("m", 100.0 + i * 0.01, 0.001 * i, rows)
        per_run = (tracemalloc.get_traced_memory()[0] - before) / 1000
    finally:
        tracemalloc.stop()
    assert per_run <= 40, per_run  # a list of four objects per run: ~136 bytes
    assert cost.metrics["m"].last_run() == Run(110.0, 1.0, 300, 300 * len(b'{"a":1,"b":"x"}'))
    assert len(cost.metrics["m"].run_list()) == 1001


def test_the_text_sent_for_a_metric_is_one_string_for_every_connection() -> None:
    """Each batched metric is sent with its columns taken by name (reaper.db.recordsafe): every connection
    makes that text, and a thousand sources running the same metric would keep a thousand copies."""
    from types import SimpleNamespace

    from reaper.db.recordsafe import record_safe_sql

    def attributes() -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n, type=SimpleNamespace(name=t, kind="scalar", schema="pg_catalog"))
                for n, t in (("tag_datname", "name"), ("xact_commit", "int8"), ("balance", "money"))]

    sql = "select datname as tag_datname, xact_commit, 1::money as balance from pg_stat_database"
    first, second = record_safe_sql(sql, attributes()), record_safe_sql(sql, attributes())
    assert first == ('select q."tag_datname", q."xact_commit", q."balance"::text as "balance" from '
                     f'({sql}\n) as q')
    assert first is second
