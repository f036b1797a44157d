"""Handing freed memory back to the system (glibc's `malloc_trim`).

A live session allocates and frees frame-sized buffers all the time on many threads
(aiortc's decoders and encoders, the engine's stages, the swap processes' hand-offs).
glibc keeps what they free in its per-thread arenas for reuse, and past its dynamic
mmap threshold even a 720p frame comes from there; the arenas fragment, the process's
RSS creeps up during a long session and stays up after the last one ends (issue 18: +3.3
MB/min over a 15-minute soak, 647 MB kept afterwards). `malloc_trim(0)` returns the free
pages of every arena to the system; called every minute or so it costs a few
milliseconds on a worker thread and keeps RSS at what is really in use.

A no-op where the C library is not glibc (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def available() -> bool:
    return _TRIM is not None


def release_free_memory() -> float:
    """Give the C heap's free pages back to the system; the seconds it took (0 where
    there is no malloc_trim). Blocking: call it off the event loop."""
    if _TRIM is None:
        return 0.0
    started = time.perf_counter()
    _TRIM(0)
    return time.perf_counter() - started
