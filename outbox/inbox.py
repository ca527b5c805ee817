# Generated from outbox/aio/inbox.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""The idempotent receiver: apply a message once, in the same transaction as its inbox row.

A relay delivers at least once (it can die after publishing and before
recording that it did), and the broker redelivers what was not acknowledged.
The inbox turns that into an effect applied once: the message's key is
inserted into the inbox table and the application's handler runs in the same
transaction on the same connection; a key already there is a duplicate, and
the handler does not run. Acknowledge the message only after this returns.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg import Connection

from outbox.tables import Tables

APPLIED = "applied"
DUPLICATE = "duplicate"

#: The application's work for one message, on the connection whose transaction it shares.
Handler = Callable[[Connection], None]


def receive(
    conn: Connection,
    key: str,
    handler: Handler,
    *,
    message_id: str = "",
    tables: Tables | None = None,
) -> str:
    """Run ``handler(conn)`` once per ``key``, committed with the key's inbox row.

    Returns ``applied`` or ``duplicate``. The transaction is this function's
    (``conn`` must not be in one): an exception from the handler rolls back
    the inbox row with the handler's writes, and is raised; the message can
    be tried again, or dead-lettered.
    """
    tables = tables or Tables()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(tables.inbox_insert(), (key, message_id or key, APPLIED))
        row = cur.fetchone()
        if not (row and row[0]):
            return DUPLICATE
        handler(conn)
    return APPLIED
