"""Bearer tokens and their scopes (settings `token`, `publish_tokens`, `view_tokens`).

- admin: everything;
- publish: WHIP, source faces, the sessions API, ingests, outputs, streams, and WHEP;
- view: WHEP and what the watch page needs (the ICE servers), nothing else.

So a viewer link (`/watch/NAME#token=T`) carries a view token, which lets whoever it is
passed to watch, and neither publish nor steer a session. Paths with no scope below
(the pages, static files, /healthz, /readyz, /api/v1/capacity) are open; an /api path
this table does not name is admin-only, so a route added later is closed until it is
placed here.
"""

from __future__ import annotations

import enum
import hmac

from livefuse.settings import Settings


class Scope(enum.Enum):
    ADMIN = "admin"
    PUBLISH = "publish"
    VIEW = "view"


_ANY = frozenset(Scope)
_PUBLISHERS = frozenset({Scope.ADMIN, Scope.PUBLISH})
_ADMIN = frozenset({Scope.ADMIN})
# The first path segment's scopes (see the module docstring).
_BY_SEGMENT = {
    "whip": _PUBLISHERS,
    "whep": _ANY,
    "metrics": _ADMIN,
}
_BY_API_RESOURCE = {
    "ice-servers": _ANY,
    "sources": _PUBLISHERS,
    "sessions": _PUBLISHERS,
    "ingests": _PUBLISHERS,
    "streams": _PUBLISHERS,
}
_OPEN_API_RESOURCES = frozenset({"capacity"})


def required_scopes(method: str, path: str) -> frozenset[Scope] | None:
    """The scopes allowed on a request, or None when it needs no token."""
    if method == "OPTIONS":  # CORS preflight: browsers send it without credentials
        return None
    segments = path.lstrip("/").split("/")
    first = segments[0]
    if first in _BY_SEGMENT:
        return _BY_SEGMENT[first]
    if first != "api":
        return None
    resource = segments[2] if len(segments) > 2 and segments[1] == "v1" else ""
    if resource in _OPEN_API_RESOURCES:
        return None
    return _BY_API_RESOURCE.get(resource, _ADMIN)


class Tokens:
    """The configured tokens: which scope a presented one has."""

    def __init__(self, settings: Settings) -> None:
        self._tokens: list[tuple[bytes, Scope]] = []
        if settings.token is not None:
            self._tokens.append((settings.token.encode(), Scope.ADMIN))
        self._tokens += [(t.encode(), Scope.PUBLISH) for t in settings.publish_tokens]
        self._tokens += [(t.encode(), Scope.VIEW) for t in settings.view_tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def scope_of(self, authorization: str) -> Scope | None:
        """The scope of an `Authorization: Bearer <token>` header's token, or None."""
        scheme, _, given = authorization.partition(" ")
        presented = given.strip().encode()
        if scheme.lower() != "bearer" or not presented:
            return None
        found = None
        # Every token compared, each in constant time: how long this takes says nothing
        # of which token came close.
        for token, scope in self._tokens:
            if hmac.compare_digest(presented, token) and found is None:
                found = scope
        return found


def describe(allowed: frozenset[Scope]) -> str:
    """`allowed` in words, for a 403: "a publish or admin token"."""
    order = [Scope.VIEW, Scope.PUBLISH, Scope.ADMIN]
    names = [scope.value for scope in order if scope in allowed]
    return "an " + names[0] + " token" if len(names) == 1 else "a " + " or ".join(names) + " token"
