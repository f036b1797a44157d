"""Freed memory goes back to the system (issue 18, item 6: RSS stayed up after the last
session ended)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from livefuse.stream import heap

pytestmark = pytest.mark.skipif(not heap.available(), reason="no glibc malloc_trim here")


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_freed_heap_memory_is_handed_back() -> None:
    # 200 MB in blocks below glibc's mmap threshold (heap memory, as frame-sized buffers
    # become once the dynamic threshold has risen), every 50th kept: the heap cannot
    # shrink from its top, so free() alone gives nothing back.
    blocks = [bytearray(b"\x01" * 64 * 1024) for _ in range(3200)]
    kept = blocks[::50]
    del blocks
    before = rss_mb()
    heap.release_free_memory()
    after = rss_mb()
    assert before - after > 100, (before, after)
    assert all(block[0] == 1 for block in kept)  # what is still in use is untouched
