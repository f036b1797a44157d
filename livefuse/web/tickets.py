"""Redirect tickets: how a publisher's token survives a scale-out redirect.

HTTP clients do not send an `Authorization` header on to another host when they follow a
redirect (libcurl, which OBS's WHIP output uses, drops it since 7.58; aiohttp too): a
307 from a full node to a peer would arrive there without the token and get 401. So the
node that checked the token signs the redirect: the peer's URL gets a `ticket` query
parameter, an HMAC over the method, the path and an expiry 30 s away, keyed by the
tokens every node of the service shares. The peer takes a valid ticket for that one
request (WHIP or WHEP) in place of the header, once: a ticket seen in a log or a URL bar
is spent.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from livefuse.settings import Settings

TICKET_TTL_S = 30


def ticket_key(settings: Settings) -> bytes | None:
    """The key tickets are signed with (None: the service has no tokens, needs none)."""
    tokens = [t for t in (settings.token, *settings.publish_tokens, *settings.view_tokens) if t]
    if not tokens:
        return None
    return hashlib.sha256(b"livefuse-redirect-ticket\0" + "\0".join(tokens).encode()).digest()


def _mac(key: bytes, method: str, path: str, expiry: int) -> str:
    return hmac.new(key, f"{expiry}:{method}:{path}".encode(), hashlib.sha256).hexdigest()[:32]


def issue(key: bytes, method: str, path: str, *, now: float | None = None) -> str:
    expiry = int(now if now is not None else time.time()) + TICKET_TTL_S
    return f"{expiry}.{_mac(key, method, path, expiry)}"


def is_valid(key: bytes, ticket: str, method: str, path: str) -> bool:
    expiry_text, _, mac = ticket.partition(".")
    if not expiry_text.isdigit() or int(expiry_text) < time.time():
        return False
    return hmac.compare_digest(mac, _mac(key, method, path, int(expiry_text)))


class TicketBook:
    """The tickets this node has taken, kept until they expire: each is good once."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._spent: dict[str, float] = {}

    def accept(self, ticket: str, method: str, path: str) -> bool:
        now = time.time()
        for old in [t for t, expiry in self._spent.items() if expiry < now]:
            del self._spent[old]
        if ticket in self._spent or not is_valid(self._key, ticket, method, path):
            return False
        self._spent[ticket] = now + TICKET_TTL_S + 1
        return True
