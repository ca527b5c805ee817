# Generated from outbox/aio/writer.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""The writer: add a message to the application's own transaction.

The message commits or rolls back with the application's writes, because it
is one more row written on the same connection, in the same transaction: no
broker is involved until a relay (:mod:`outbox.relay`) publishes it.

``status``: ``'pending'`` for a status relay; None (the default) for rows
last-id relays track by their positions. Pick one per deployment: a status
relay never sends a NULL-status row, a last-id relay never reads a pending one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from psycopg import Connection

from outbox.message import OutboxMessage
from outbox.tables import Tables

WriteStatus = Literal["pending"] | None


def insert_statement(tables: Tables) -> str:
    """The INSERT of one outbox row (named parameters: key, destination, headers, body, status)."""
    return (
        f"INSERT INTO {tables.outbox} ({tables.key}, destination, headers, body, status) "
        "VALUES (%(key)s, %(destination)s, %(headers)s, %(body)s, %(status)s)"
    )


def row_of(message: OutboxMessage, status: WriteStatus) -> dict[str, str | None]:
    """The INSERT's parameters for ``message``."""
    if status not in ("pending", None):
        raise ValueError(f"outbox status {status!r}: 'pending' (status relay) or None (last-id)")
    return {
        "key": message.key,
        "destination": message.destination,
        "headers": json.dumps(dict(message.headers), sort_keys=True),
        "body": message.body,
        "status": status,
    }


def write(
    conn: Connection,
    messages: OutboxMessage | Sequence[OutboxMessage],
    *,
    tables: Tables | None = None,
    status: WriteStatus = None,
) -> None:
    """Add ``messages`` to the transaction open on ``conn`` (psycopg opens one if none is).

    Nothing is committed here: the caller commits (or rolls back) its own work
    and the messages with it. A key already in the outbox raises
    psycopg.errors.UniqueViolation, like any duplicate the application writes.
    """
    tables = tables or Tables()
    batch = [messages] if isinstance(messages, OutboxMessage) else list(messages)
    if not batch:
        return
    with conn.cursor() as cur:
        cur.executemany(insert_statement(tables), [row_of(m, status) for m in batch])
