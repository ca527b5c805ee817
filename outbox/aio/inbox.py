"""The idempotent receiver: apply a message once, in the same transaction as its inbox row.

A relay delivers at least once (it can die after publishing and before
recording that it did), and the broker redelivers what was not acknowledged.
The inbox turns that into an effect applied once: the message's key is
inserted into the inbox table and the application's handler runs in the same
transaction on the same connection; a key already there is a duplicate, and
the handler does not run. Acknowledge the message only after this returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from psycopg import AsyncConnection

from outbox.tables import Tables

APPLIED = "applied"
DUPLICATE = "duplicate"

#: The application's work for one message, on the connection whose transaction it shares.
Handler = Callable[[AsyncConnection], Awaitable[None]]


async def receive(
    conn: AsyncConnection,
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
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(tables.inbox_insert(), (key, message_id or key, APPLIED))
        row = await cur.fetchone()
        if not (row and row[0]):
            return DUPLICATE
        await handler(conn)
    return APPLIED
