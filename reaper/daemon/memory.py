"""glibc malloc tuning for a long-running daemon (issue 14 Build 3): keep freed heap from staying resident.

A collector allocates in bursts (one tick's rows, its encoded lines) and then idles. glibc keeps what a
burst freed: each thread that ever called malloc may get its own arena (up to 8 per core), and the
dynamic mmap threshold climbs after the first large free, which also raises the trim threshold up to
64 MB, so big freed blocks sit in the heap instead of going back to the OS. `tune()` (once, at daemon
start-up) fixes both thresholds and caps the arenas; `trim()` (after a burst of work every 30 s, see
`Housekeeper`) hands free heap pages back. Both do nothing off glibc, and never raise.

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
import math
import os
from typing import Any

import trio

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
    """Freezes the long-lived heap while the fleet settles (see the module's note), driven by `due()`.

    It never asks gc.get_freeze_count(): that walks the whole permanent generation (~10 ms at 1000
    sources), and asked every 5 s it was most of an idle daemon's CPU."""

    def __init__(self, freeze_seconds: float = FREEZE_SECONDS, refreeze_seconds: float = REFREEZE_SECONDS) -> None:
        self.freeze_seconds = freeze_seconds
        self.refreeze_seconds = refreeze_seconds
        self.until = -1.0  # trio time until which it freezes every freeze_seconds
        self.freezes = 0
        self.refreezes = 0
        self._started: float | None = None  # the trio time of the first due() (a freeze is due freeze_seconds on)
        self._frozen_at = -math.inf
        self._refrozen_at = 0.0

    def settle(self, seconds: float) -> None:
        """Freeze survivors for the next `seconds` (from now on trio's clock), e.g. a fleet's first round of ticks."""
        self.until = max(self.until, trio.current_time() + seconds)

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

    def due(self, now: float) -> None:
        """A moment the process is awake anyway (Housekeeper): a step when one is due, freeze_seconds after the
        last freeze (and after the first call) while settling, else once the refreeze period has passed."""
        if self._started is None:
            self._started = self._refrozen_at = now
        if now <= self.until or _paused:
            if now - max(self._frozen_at, self._started) >= self.freeze_seconds:
                self._frozen_at = now
                self.step(now, self._refrozen_at)
        elif self.freezes and now - self._refrozen_at >= self.refreeze_seconds and self.step(now, self._refrozen_at):
            self._refrozen_at = now


class Housekeeper:
    """The daemon's memory chores, in moments when its process is awake anyway: the status writer calls
    `after_check()` after each of its checks, which follow each burst of work (reaper.daemon.statuswrite)
    and come at least every check_seconds. No task of its own (a source's worth of tasks and their wake-ups
    fewer): every TRIM_SECONDS the generated sources are forgotten and the heap trimmed (a few hundred
    microseconds), and the GcSettler freezes or refreezes when due. Only `reaper run`'s process has one
    (reaper.daemon.root), not a test that runs a Daemon beside other things."""

    def __init__(self, settler: GcSettler, trim_seconds: float = TRIM_SECONDS) -> None:
        self.settler = settler
        self.trim_seconds = trim_seconds
        self.trims = 0
        self._trimmed: float | None = None

    def after_check(self) -> None:
        now = trio.current_time()
        if self._trimmed is None:
            self._trimmed = now  # start-up: nothing freed yet
        elif now - self._trimmed >= self.trim_seconds:
            self._trimmed = now
            forget_generated_sources()
            trim()
            self.trims += 1
        self.settler.due(now)
