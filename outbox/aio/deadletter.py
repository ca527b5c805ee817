"""Move messages the consumer cannot apply to their dead-letter queue.

The move is one STOMP transaction: the ACK of the original and the SEND of
its copy commit together, so a crash in between leaves the original on its
queue (redelivered) and no copy; the COMMIT's receipt says both happened.
The copy's headers are :func:`outbox.rejection.dead_letter_headers`.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from coordinator.errors import ParticipantError
from outbox.rejection import Rejection, dead_letter_headers, dead_letter_queue
from participants.aio.stomp_ops import AsyncStompOperations
from participants.stomp_core import Message


async def dead_letter(
    client: AsyncStompOperations,
    rejections: Sequence[Rejection],
    *,
    destination: str,
    receipt_timeout: float = 10.0,
) -> None:
    """Move ``rejections`` (delivered from ``destination`` on ``client``) to its
    dead-letter queue.

    One STOMP transaction: each original's ACK and its copy's SEND, each with a
    receipt so that a refused frame aborts the whole transaction, then COMMIT.
    Raises ParticipantError if the move did not certainly happen; the caller
    drops the connection, and the originals come back (redelivered).
    """
    if not rejections:
        return
    dlq = dead_letter_queue(destination)
    transaction = f"dlq-{secrets.token_hex(8)}"
    at = datetime.now(UTC).isoformat(timespec="milliseconds")
    await client.begin(transaction)
    try:
        for rejection in rejections:
            await move(
                client,
                rejection.message,
                dlq,
                dead_letter_headers(rejection, destination, at),
                transaction=transaction,
                receipt_timeout=receipt_timeout,
            )
    except ParticipantError:
        if client.alive:  # otherwise the broker aborts it when the connection is dropped
            with contextlib.suppress(ParticipantError):
                await client.abort(transaction, receipt_timeout)
        raise
    await client.commit(transaction, receipt_timeout)


async def move(
    client: AsyncStompOperations,
    message: Message,
    target: str,
    headers: Mapping[str, str],
    *,
    transaction: str,
    receipt_timeout: float,
) -> None:
    """In ``transaction``: ACK ``message`` and SEND its body to ``target`` with ``headers``,
    each with a receipt, so that a refused frame aborts the whole transaction."""
    await client.request(
        "ACK",
        {"id": message.ack_id, "transaction": transaction},
        timeout=receipt_timeout,
        what=f"ACK of {message.message_id}",
    )
    await client.send(
        target, message.body, headers, transaction=transaction, receipt_timeout=receipt_timeout
    )
