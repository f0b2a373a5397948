"""glibc malloc tuning for a long-running daemon (issue 14 Build 3): keep freed heap from staying resident.

A collector allocates in bursts (one tick's rows, its encoded lines) and then idles. glibc keeps what a
burst freed: each thread that ever called malloc may get its own arena (up to 8 per core), and the
dynamic mmap threshold climbs after the first large free, which also raises the trim threshold up to
64 MB, so big freed blocks sit in the heap instead of going back to the OS. `tune()` (once, at daemon
start-up) fixes both thresholds and caps the arenas; `trim()` (after a tick every 30 s, see
`trim_every`) hands free heap pages back. Both do nothing off glibc, and never raise.

attrs and cattrs also keep the source text of every method they generate in `linecache` (for debuggers:
~0.5 MB for reaper's, trio's and the config's classes); `forget_generated_sources` drops it (a traceback
through such a method still names it, without its source line).

Python's own small-object allocator (pymalloc) takes 1 MiB arenas straight from mmap and frees an
arena when it is empty; none of this applies to it.

Python's cycle collector: a full (generation 2) collection walks every tracked object, and while a fleet
starts the long-lived heap grows by more than a quarter again and again, so full collections come every
~10 s and each stalls the loop for as long as the heap is big (measured, 1000 basic sources: 4 of them in
the first 45 s, 136-236 ms each, the ticks' worst lateness). `GcSettler` moves what survived into the
permanent generation (`gc.freeze()`) every few seconds while the fleet settles (start-up, a reload), so a
full collection walks only what is newer; a freeze of 280k objects costs microseconds. Cyclic garbage among
frozen objects (a connection replaced later) would never be collected, so once an hour everything is
unfrozen, collected and frozen again (measured: a full collection after start-up freed 24 objects).
"""

from __future__ import annotations

import ctypes
import gc
import linecache
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from reaper.quiet import until_quiet

log = logging.getLogger("reaper.daemon.memory")

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

ARENA_MAX = 2  # the trio thread, and one for every worker thread (DNS, file writes) together
MMAP_THRESHOLD = 256 * 1024  # a block this big is mmapped and unmapped when freed (a large result's list)
TRIM_THRESHOLD = 512 * 1024  # free heap beyond this at the top goes back to the OS at once
TRIM_SECONDS = 30.0
GENERATED = ("<attrs generated ", "<cattrs generated ")  # linecache names of generated methods' sources


def _glibc() -> Any | None:
    """The process's C library when it is glibc (with mallopt and malloc_trim), else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (ValueError, OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def tune() -> bool:
    """Fix glibc's thresholds and cap its arenas; True when it applied (False off glibc)."""
    if _LIBC is None:
        return False
    ok = all(_LIBC.mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, ARENA_MAX), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not ok:
        log.debug("mallopt refused a setting; glibc's defaults stay")
    return ok


def trim() -> bool:
    """Give free heap memory back to the OS (malloc_trim(0)); True when some was released."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


def forget_generated_sources() -> int:
    """Drop the linecache entries of attrs' and cattrs' generated methods; how many went."""
    names = [name for name in list(linecache.cache) if name.startswith(GENERATED)]
    for name in names:
        linecache.cache.pop(name, None)
    return len(names)


async def trim_every(seconds: float = TRIM_SECONDS, after_work: Callable[[], Awaitable[None]] | None = None) -> None:
    """Every `seconds`: forget generated sources made since (config reloads generate more), then trim
    the heap (a few hundred microseconds each; the trim is a no-op off glibc).

    With `after_work` (the daemon's WorkPulse.next): at the end of the first burst of work (a tick) once
    `seconds` have passed, on no timer of its own: a wake-up of an idle process costs more than the trim
    (reaper.quiet), and a daemon that does no work makes nothing to trim."""
    if after_work is None:
        while True:
            await trio.sleep(seconds)
            forget_generated_sources()
            trim()
    last = trio.current_time()
    while True:
        await after_work()
        if trio.current_time() - last >= seconds:
            await until_quiet(seconds)
            forget_generated_sources()
            trim()
            last = trio.current_time()


FREEZE_SECONDS = 5.0  # while settling, survivors are frozen this often
REFREEZE_SECONDS = 3600.0  # one full collection of the frozen objects (their cyclic garbage) this often


_paused = False  # automatic collections are off until the GcSettler's first freeze (`reaper run`)


def pause_collections_until_settled() -> None:
    """`reaper run`, before its imports and its config: no automatic collection until the GcSettler's first
    freeze (FREEZE_SECONDS into the run), which moves everything alive then into the permanent generation
    and turns collections back on. Start-up makes objects that live as long as the process (modules, the
    config, the sources) and hardly any garbage; its full collections walked them again and again (1000
    sources: 17 and 61 ms in the first half second, 106 ms of collections in the first second of a ~0.5 s
    start)."""
    global _paused
    gc.disable()
    _paused = True


def _resume_collections() -> None:
    global _paused
    if _paused:
        _paused = False
        gc.enable()


class GcSettler:
    """Freezes the long-lived heap while the fleet settles (see the module's note); `run()` is its task.

    Between settling windows it sleeps until the next refreeze is due (or `settle()` wakes it), and it never
    asks gc.get_freeze_count(): that walks the whole permanent generation (~10 ms at 1000 sources), and
    asked every 5 s it was most of an idle daemon's CPU."""

    def __init__(self, freeze_seconds: float = FREEZE_SECONDS, refreeze_seconds: float = REFREEZE_SECONDS) -> None:
        self.freeze_seconds = freeze_seconds
        self.refreeze_seconds = refreeze_seconds
        self.until = -1.0  # trio time until which it freezes every freeze_seconds
        self.freezes = 0
        self.refreezes = 0
        self.wakeups = 0
        self._wake: trio.Event | None = None

    def settle(self, seconds: float) -> None:
        """Freeze survivors for the next `seconds` (from now on trio's clock), e.g. a fleet's first round of ticks."""
        self.until = max(self.until, trio.current_time() + seconds)
        if self._wake is not None:
            self._wake.set()

    def step(self, now: float, last_refreeze: float) -> bool:
        """One wake-up: freeze while settling; past the refreeze period, collect the frozen objects and freeze
        again. True when it refroze."""
        if now <= self.until or _paused:
            gc.freeze()
            self.freezes += 1
            _resume_collections()
        elif self.freezes and now - last_refreeze >= self.refreeze_seconds:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.refreezes += 1
            return True
        return False

    async def run(self) -> None:
        last_refreeze = trio.current_time()
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            delay = self.freeze_seconds if now <= self.until else max(0.0, last_refreeze + self.refreeze_seconds - now)
            with trio.move_on_after(delay):
                await self._wake.wait()
            if self._wake.is_set():  # settle() asked: freeze every freeze_seconds from now on
                continue
            self.wakeups += 1
            now = trio.current_time()
            if self.step(now, last_refreeze):
                last_refreeze = now
