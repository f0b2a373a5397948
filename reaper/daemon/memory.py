"""glibc malloc tuning for a long-running daemon (issue 14 Build 3): keep freed heap from staying resident.

A collector allocates in bursts (one tick's rows, its encoded lines) and then idles. glibc keeps what a
burst freed: each thread that ever called malloc may get its own arena (up to 8 per core), and the
dynamic mmap threshold climbs after the first large free, which also raises the trim threshold up to
64 MB, so big freed blocks sit in the heap instead of going back to the OS. `tune()` (once, at daemon
start-up) fixes both thresholds and caps the arenas; `trim()` (after each round of ticks, see
`trim_every`) hands free heap pages back. Both do nothing off glibc, and never raise.

attrs and cattrs also keep the source text of every method they generate in `linecache` (for debuggers:
~0.5 MB for reaper's, trio's and the config's classes); `forget_generated_sources` drops it (a traceback
through such a method still names it, without its source line).

Python's own small-object allocator (pymalloc) takes 1 MiB arenas straight from mmap and frees an
arena when it is empty; none of this applies to it.
"""

from __future__ import annotations

import ctypes
import linecache
import logging
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


async def trim_every(seconds: float = TRIM_SECONDS) -> None:
    """Every `seconds`: forget generated sources made since (config reloads generate more), then trim
    the heap (a few hundred microseconds each; the trim is a no-op off glibc)."""
    while True:
        await trio.sleep(seconds)
        forget_generated_sources()
        trim()
