"""aiortc's own background task, quiet when a peer is closed under it.

`RTCPeerConnection` starts its ICE and DTLS work as a task nobody awaits. When the peer
is closed while that task still waits (a client that ends its session right after the
offer, an offer ended by its ICE deadline because it never connected), the task fails
with InvalidStateError ("RTCIceTransport is closed") or a ConnectionError, and asyncio
logs "Task exception was never retrieved" with a traceback: an ERROR for what is the
normal end of such a peer. This loop exception handler logs those at DEBUG and passes
everything else on unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiortc.exceptions import InvalidStateError

log = logging.getLogger("livefuse.webrtc")

# aiortc's private coroutine (name-mangled): matched by name only, never called.
_CONNECT_TASK = "RTCPeerConnection.__connect"


def _is_aborted_connect(context: dict[str, Any]) -> bool:
    task = context.get("future") or context.get("task")
    error = context.get("exception")
    if not isinstance(task, asyncio.Task) or not isinstance(
        error, InvalidStateError | ConnectionError
    ):
        return False
    return getattr(task.get_coro(), "__qualname__", "") == _CONNECT_TASK


def quiet_aborted_connects(loop: asyncio.AbstractEventLoop) -> None:
    """Install the handler on `loop`, in front of whatever handler it had."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _is_aborted_connect(context):
            log.debug("event=peer_connect_aborted error=%r", context.get("exception"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
