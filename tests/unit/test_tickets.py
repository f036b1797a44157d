"""Redirect tickets (web/tickets.py): valid for the one request they were made for, for
30 s, under the tokens they were made with."""

from __future__ import annotations

import time

from livefuse.settings import Settings
from livefuse.web import tickets


def test_a_ticket_is_good_for_its_request_only() -> None:
    key = tickets.ticket_key(Settings(token="admin-token", publish_tokens=["obs"]))
    assert key is not None
    ticket = tickets.issue(key, "POST", "/whip/studio")
    assert tickets.is_valid(key, ticket, "POST", "/whip/studio")
    assert not tickets.is_valid(key, ticket, "POST", "/whip/other")
    assert not tickets.is_valid(key, ticket, "DELETE", "/whip/studio")
    expiry, mac = ticket.split(".")
    assert not tickets.is_valid(key, f"{int(expiry) + 60}.{mac}", "POST", "/whip/studio")
    assert not tickets.is_valid(key, "garbage", "POST", "/whip/studio")
    other = tickets.ticket_key(Settings(token="another-service"))
    assert other is not None and not tickets.is_valid(other, ticket, "POST", "/whip/studio")


def test_tickets_expire_and_are_not_needed_without_tokens() -> None:
    key = tickets.ticket_key(Settings(token="admin-token"))
    assert key is not None
    stale = tickets.issue(key, "POST", "/whip", now=time.time() - tickets.TICKET_TTL_S - 1)
    assert not tickets.is_valid(key, stale, "POST", "/whip")
    assert tickets.ticket_key(Settings()) is None


def test_a_ticket_is_taken_once() -> None:
    key = tickets.ticket_key(Settings(token="admin-token"))
    assert key is not None
    book = tickets.TicketBook(key)
    ticket = tickets.issue(key, "POST", "/whip")
    assert book.accept(ticket, "POST", "/whip")
    assert not book.accept(ticket, "POST", "/whip")
