"""One message in the outbox: its key, where it goes, its headers and its body."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OutboxMessage:
    """What the writer records and the relay publishes.

    ``key`` identifies the message for the consumer's inbox (it travels in the
    header named by ``Tables.key_header``): a retry or replay carries the same
    key, so the consumer applies it once. ``headers`` are the application's own
    STOMP headers (a ``type``, a correlation id...).
    """

    key: str
    destination: str
    body: str
    headers: Mapping[str, str] = field(default_factory=dict)
