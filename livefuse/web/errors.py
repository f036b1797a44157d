"""Errors as the HTTP contract has them: JSON `{"error": {"code", "message"}}`, except on
the SDP endpoints (WHIP/WHEP), whose clients expect plain text."""

from __future__ import annotations

import json
from collections.abc import Mapping


class ApiError(Exception):
    """Raised by a handler; turned into a response by the error middleware."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        plain_text: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.plain_text = plain_text

    def body(self) -> tuple[str, str]:
        """(content type, text)."""
        if self.plain_text:
            return "text/plain", self.message + "\n"
        return "application/json", json.dumps(
            {"error": {"code": self.code, "message": self.message}}
        )


def json_error(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> ApiError:
    return ApiError(status, code, message, headers=headers)


def sdp_error(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> ApiError:
    return ApiError(status, code, message, headers=headers, plain_text=True)
