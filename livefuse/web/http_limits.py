"""Limits on the HTTP requests themselves, and a quiet word for what breaks them.

aiohttp's parser refuses a request line or header line past its limit with a 400 and
logs a full ERROR traceback for each one: noise a scanner can fill the log with. Here
the parser's request-line limit is raised to `PARSER_LINE_LIMIT` so that an over-long
URL reaches `url_limit`, which answers 414 (URI Too Long) past `MAX_URL_BYTES`; what the
parser still refuses (a longer line, a malformed request) is one INFO line, no traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

# What browsers, OBS and proxies send stays far below this; nginx's default is 8 KiB.
MAX_URL_BYTES = 8 * 1024
# The parser holds at most this much of one request line (per connection) before it
# gives up; between the two, the answer is a proper 414.
PARSER_LINE_LIMIT = 128 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class QuietServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, with the client's malformed requests (BadHttpMessage:
    a line too long, a bad chunk size, a bad header) as one INFO line each."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, BadHttpMessage):
            reason = " ".join(str(error.message).split())[:160]
            self.logger.info("event=bad_http_request status=%d reason=%r", error.code, reason)
            return
        self.logger.exception(msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


def handler_args() -> dict[str, Any]:
    """`web.Application(handler_args=...)`: the parser's line limit and the quiet log."""
    return {
        "max_line_size": PARSER_LINE_LIMIT,
        "logger": QuietServerLog(logging.getLogger("aiohttp.server")),
    }


@web.middleware
async def url_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """414 for a URL past `MAX_URL_BYTES`, before anything else looks at it."""
    if len(request.raw_path) > MAX_URL_BYTES:
        logging.getLogger("livefuse.http").info(
            "event=bad_request status=414 url_bytes=%d", len(request.raw_path)
        )
        return web.Response(
            status=414,
            text=f"the URL is longer than {MAX_URL_BYTES} bytes\n",
            content_type="text/plain",
        )
    return await handler(request)
