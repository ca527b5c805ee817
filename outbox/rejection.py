"""A message the consumer gives up on, and the headers of its dead-letter copy (no I/O).

A message the consumer cannot apply goes from ``/queue/<name>`` to
``/queue/DLQ.<name>`` (:mod:`outbox.deadletter` moves it). The copy keeps the
body and the application headers and adds:

* ``twopc-dlq-reason``: why it could not be applied (one line);
* ``twopc-dlq-destination``: where it came from;
* ``twopc-dlq-attempts``: how many times applying it was tried;
* ``twopc-dlq-at``: when it was dead-lettered (UTC, ISO 8601);
* ``twopc-dlq-message-id``: the broker's id of the original.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.errors import ConfigurationError
from participants.stomp_core import Message

QUEUE_PREFIX = "/queue/"
DLQ_PREFIX = "/queue/DLQ."

REASON_HEADER = "twopc-dlq-reason"
DESTINATION_HEADER = "twopc-dlq-destination"
ATTEMPTS_HEADER = "twopc-dlq-attempts"
AT_HEADER = "twopc-dlq-at"
MESSAGE_ID_HEADER = "twopc-dlq-message-id"
DLQ_HEADERS = (REASON_HEADER, DESTINATION_HEADER, ATTEMPTS_HEADER, AT_HEADER, MESSAGE_ID_HEADER)

#: Headers the broker sets on a delivered MESSAGE (or the client sets per frame): a copy
#: gets fresh ones from its own SEND.
BROKER_HEADERS = frozenset(
    {
        "ack",
        "content-length",
        "content-type",
        "destination",
        "expires",
        "message-id",
        "persistent",
        "priority",
        "receipt",
        "redelivered",
        "subscription",
        "timestamp",
        "transaction",
    }
)

#: Longest reason kept in a header (an exception's text can be long).
MAX_REASON = 500


def dead_letter_queue(destination: str) -> str:
    """``/queue/DLQ.<name>`` for the queue ``/queue/<name>``."""
    name = destination.removeprefix(QUEUE_PREFIX)
    if name == destination or not name or destination.startswith(DLQ_PREFIX):
        raise ConfigurationError(
            f"no dead-letter queue for {destination!r}: it must be a /queue/<name> "
            "that is not itself a dead-letter queue"
        )
    return DLQ_PREFIX + name


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """``text`` on one line (headers and log lines), cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def application_headers(message: Message) -> dict[str, str]:
    """The headers a copy of ``message`` keeps: neither the broker's nor a dead letter's."""
    return {
        key: value
        for key, value in message.headers.items()
        if key not in BROKER_HEADERS and key not in DLQ_HEADERS
    }


@dataclass(frozen=True)
class Rejection:
    """A message the consumer gives up on, why, and after how many attempts."""

    message: Message
    reason: str
    attempts: int = 1

    @property
    def transfer_id(self) -> str:
        """The ``transfer-id`` header (the transfer scenario's key), empty if none."""
        return self.message.headers.get("transfer-id", "")


def dead_letter_headers(rejection: Rejection, destination: str, at: str) -> dict[str, str]:
    """The headers of a rejected message's copy: its own, and why, whence, when."""
    headers = application_headers(rejection.message)
    headers.update(
        {
            REASON_HEADER: one_line(rejection.reason),
            DESTINATION_HEADER: destination,
            ATTEMPTS_HEADER: str(rejection.attempts),
            AT_HEADER: at,
            MESSAGE_ID_HEADER: rejection.message.message_id,
        }
    )
    return headers
