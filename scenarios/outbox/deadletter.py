"""The dead-letter queue: where the consumer moves a message it cannot apply, and the way back.

A message the consumer cannot apply (a malformed body, a missing or invalid
header, a kind it does not take, a constraint of B it violates, an account B
does not have, or a transient failure that outlasted its retries) goes from
``/queue/<name>`` to ``/queue/DLQ.<name>``. The move is the outbox
component's (:mod:`outbox.deadletter`, written once for asyncio in
:mod:`outbox.aio.deadletter` and generated for threads): one STOMP
transaction in which the ACK of the original and the SEND of its copy commit
together, so a crash in between leaves the original on its queue
(redelivered) and no copy; the COMMIT's receipt says both happened. The
copy's headers are :mod:`outbox.rejection`'s (``twopc-dlq-reason``,
``-destination``, ``-attempts``, ``-at``, ``-message-id``).

:func:`dead_letter` (threads) and :func:`dead_letter_async` (asyncio) keep
their names here for the consumers that call them.

:func:`list_dead_letters` browses a dead-letter queue (``twopc outbox
failed``); :func:`requeue` sends messages back to their original destination
once the cause is fixed (``twopc outbox requeue``), again ACK and SEND in one
transaction per message.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import ParticipantError
from coordinator.events import get_logger
from outbox.aio.deadletter import dead_letter as dead_letter_async
from outbox.deadletter import dead_letter, move
from outbox.rejection import AT_HEADER as AT_HEADER
from outbox.rejection import ATTEMPTS_HEADER as ATTEMPTS_HEADER
from outbox.rejection import BROKER_HEADERS as BROKER_HEADERS
from outbox.rejection import DESTINATION_HEADER as DESTINATION_HEADER
from outbox.rejection import DLQ_HEADERS as DLQ_HEADERS
from outbox.rejection import MAX_REASON as MAX_REASON
from outbox.rejection import MESSAGE_ID_HEADER as MESSAGE_ID_HEADER
from outbox.rejection import REASON_HEADER as REASON_HEADER
from outbox.rejection import Rejection as Rejection
from outbox.rejection import application_headers as application_headers
from outbox.rejection import dead_letter_headers as dead_letter_headers
from outbox.rejection import one_line as one_line
from participants.stomp_client import Message, StompClient
from scenarios import events as ev
from scenarios.transfer.destinations import DLQ_PREFIX as DLQ_PREFIX
from scenarios.transfer.destinations import QUEUE_PREFIX as QUEUE_PREFIX
from scenarios.transfer.destinations import dead_letter_queue as dead_letter_queue

__all__ = ["dead_letter", "dead_letter_async"]


# -- reading and requeueing ---------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One message on a dead-letter queue, as ``twopc outbox failed`` shows it."""

    transfer_id: str
    kind: str  # the ``type`` header
    reason: str
    destination: str  # where it came from, and where requeue sends it
    attempts: int
    dead_lettered_at: str  # UTC, ISO 8601
    message_id: str  # the copy's id on the dead-letter queue
    body: str

    @classmethod
    def of(cls, message: Message) -> DeadLetter:
        headers = message.headers
        try:
            attempts = int(headers.get(ATTEMPTS_HEADER, "0"))
        except ValueError:
            attempts = 0
        return cls(
            transfer_id=headers.get("transfer-id", ""),
            kind=headers.get("type", ""),
            reason=headers.get(REASON_HEADER, ""),
            destination=headers.get(DESTINATION_HEADER, ""),
            attempts=attempts,
            dead_lettered_at=headers.get(AT_HEADER, ""),
            message_id=message.message_id,
            body=message.body,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "type": self.kind,
            "reason": self.reason,
            "destination": self.destination,
            "attempts": self.attempts,
            "dead_lettered_at": self.dead_lettered_at,
            "message_id": self.message_id,
        }


def list_dead_letters(client: StompClient, destination: str) -> list[DeadLetter]:
    """Every message on ``destination``'s dead-letter queue, oldest first (a full browse).

    The browse leaves a sentinel at the queue's tail; it is taken off again (with
    any an earlier browse left), so that listing leaves the queue as it was.
    """
    dlq = dead_letter_queue(destination)
    letters = [DeadLetter.of(m) for m in client.browse_complete(dlq) if not m.is_sentinel]
    drop_sentinels(client, dlq)
    return letters


def drop_sentinels(
    client: StompClient, queue: str, *, idle_timeout: float = 0.5, receipt_timeout: float = 10.0
) -> int:
    """Take the browse sentinels off ``queue``; every other message stays. Returns how many.

    Consumes the queue to its end (until nothing comes for ``idle_timeout``) and
    ACKs only the sentinels; the others go back to the queue, in their order,
    when the subscription ends.
    """
    subscription = client.subscribe(queue, ack="client-individual", prefetch=1000)
    dropped = 0
    try:
        while (message := subscription.get(idle_timeout)) is not None:
            if message.is_sentinel:
                client.ack(message, receipt_timeout=receipt_timeout)
                dropped += 1
    finally:
        subscription.unsubscribe(timeout=receipt_timeout)
    return dropped


@dataclass
class RequeueReport:
    """What :func:`requeue` did: transfer ids sent back, and ids asked for but not found."""

    requeued: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"requeued": self.requeued, "not_found": self.not_found}


def requeue(
    client: StompClient,
    destination: str,
    transfer_ids: Collection[str] | None = None,
    *,
    idle_timeout: float = 2.0,
    receipt_timeout: float = 10.0,
) -> RequeueReport:
    """Send dead letters of ``destination`` back to where they came from (all, or these ids).

    Each one is consumed from the dead-letter queue and sent back without its
    ``twopc-dlq-*`` headers in one STOMP transaction (ACK and SEND, then
    COMMIT with a receipt). Messages not asked for are left where they are.
    Browse sentinels met on the way are dropped.
    """
    dlq = dead_letter_queue(destination)
    wanted = {
        m.message_id: m
        for m in list_dead_letters(client, destination)
        if transfer_ids is None or m.transfer_id in transfer_ids
    }
    report = RequeueReport()
    subscription = client.subscribe(dlq, ack="client-individual", prefetch=100)
    deadline = time.monotonic() + max(idle_timeout, 0.1)
    while wanted and time.monotonic() < deadline:
        message = subscription.get(0.2)
        if message is None:
            continue
        deadline = time.monotonic() + idle_timeout
        if message.is_sentinel:
            client.ack(message, receipt_timeout=receipt_timeout)
            continue
        letter = wanted.pop(message.message_id, None)
        if letter is None:
            continue  # not asked for: back on the queue when this subscription ends
        target = letter.destination or destination
        transaction = f"requeue-{secrets.token_hex(8)}"
        client.begin(transaction)
        move(
            client,
            message,
            target,
            application_headers(message),
            transaction=transaction,
            receipt_timeout=receipt_timeout,
        )
        client.commit(transaction, receipt_timeout)
        report.requeued.append(letter.transfer_id or letter.message_id)
    subscription.unsubscribe(timeout=receipt_timeout)
    found = set(report.requeued) | {m.transfer_id for m in wanted.values()}
    if transfer_ids is not None:
        report.not_found = sorted(set(transfer_ids) - found)
    if wanted:
        raise ParticipantError(
            f"{len(wanted)} dead letters of {dlq} were browsed but not delivered within "
            f"{idle_timeout:g} s (another consumer holds them?); run the requeue again",
            participant="requeue",
        )
    get_logger(component="outbox").info(
        ev.DEAD_LETTERS_REQUEUED, destination=destination, messages=len(report.requeued)
    )
    return report
