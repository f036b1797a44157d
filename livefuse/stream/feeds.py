"""What the FFmpeg ingest and push have in common: which URLs they take, how a URL is
shown without its secrets, and the reconnect backoff.

The FFmpeg inside PyAV's wheel speaks RTMP, RTMPS (GnuTLS), RTSP, HTTP(S) and HLS; it is
built without libsrt, so an `srt://` URL is refused up front with that reason rather than
failing later in a retry loop (a system FFmpeg build with libsrt lifts the refusal).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import av

INGEST_SCHEMES = ("rtmp", "rtmps", "rtsp", "rtsps", "http", "https", "srt")
PUSH_SCHEMES = ("rtmp", "rtmps")
LIVE_SCHEMES = ("rtmp", "rtmps", "rtsp", "rtsps", "srt")
"""Feeds that are live by nature: their end is a dropped connection, so they are
reconnected. An http(s) URL is live when it is an HLS playlist (`.m3u8`)."""


class FeedUrlError(ValueError):
    """A URL the ingest or push cannot take, with the reason in words."""


def has_srt() -> bool:
    configuration = av._core.library_meta["libavformat"]["configuration"]
    return "--enable-libsrt" in configuration


def check_url(url: str, *, schemes: tuple[str, ...]) -> str:
    """The URL's scheme, or FeedUrlError saying why it cannot be used."""
    if not isinstance(url, str) or not url.strip():
        raise FeedUrlError("the url must be a non-empty string")
    if any(ch in url for ch in "\r\n\0") or len(url) > 2048:
        raise FeedUrlError("the url has control characters or is longer than 2048 characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise FeedUrlError(
            f"unsupported scheme {parts.scheme or 'none'!r}: use one of {', '.join(schemes)}"
        )
    if scheme == "srt" and not has_srt():
        raise FeedUrlError(
            "srt:// needs an FFmpeg built with libsrt, and the one in PyAV's wheel is not; "
            "relay SRT through a media server (e.g. MediaMTX) to RTMP or RTSP"
        )
    if not parts.hostname:
        raise FeedUrlError(f"the url {redact(url)!r} names no host")
    return scheme


def is_live(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() in LIVE_SCHEMES or parts.path.lower().endswith(".m3u8")


def redact(url: str) -> str:
    """The URL as logs and stats show it: no user:password, no query, and the last path
    segment (an RTMP stream key is a secret) shortened to its first 3 characters."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    path = parts.path
    head, _, last = path.rpartition("/")
    if head and len(last) > 3:
        path = f"{head}/{last[:3]}..."
    return urlunsplit((parts.scheme, host, path, "", ""))


@dataclass
class Backoff:
    """Reconnect delays that double from `first_s` up to `max_s`, reset by `ok()`."""

    first_s: float = 1.0
    max_s: float = 30.0
    _next_s: float = 0.0

    def next_delay(self) -> float:
        self._next_s = self.first_s if self._next_s == 0 else min(self._next_s * 2, self.max_s)
        return self._next_s

    def ok(self) -> None:
        self._next_s = 0.0


def error_text(error: BaseException, url: str) -> str:
    """An error in words, without the URL FFmpeg puts in its messages (credentials,
    tokens, stream keys): it goes to stats, logs and status lines."""
    return f"{type(error).__name__}: {error}".replace(url, redact(url))
