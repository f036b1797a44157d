"""Background chores of a running app that belong to no request or session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from livefuse.stream import heap

log = logging.getLogger("livefuse.service")


def heap_trimmer(interval_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """An app cleanup context: every `interval_s`, the C heap's free pages go back to
    the system (stream/heap.py), on a worker thread. So memory does not creep up over
    a long session, and what the sessions used is handed back within `interval_s` of
    the last one ending."""

    async def trim_every_while() -> None:
        while True:
            await asyncio.sleep(interval_s)
            took_s = await asyncio.to_thread(heap.release_free_memory)
            log.debug("event=heap_trimmed took_ms=%.1f", took_s * 1000.0)

    async def trimmer(_: web.Application) -> AsyncIterator[None]:
        if interval_s <= 0 or not heap.available():
            yield
            return
        task = asyncio.get_running_loop().create_task(trim_every_while(), name="livefuse-heap")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return trimmer
