"""Broker destinations the transfer scenario names: a queue's dead-letter queue, and the
CDC fan-out's virtual topic, its consumers and the queue each reads.

See scenarios.outbox.deadletter for what goes to a dead-letter queue, and
scenarios.outbox.fanout for how the broker copies the topic's messages into each
consumer's queue.
"""

from __future__ import annotations

from coordinator.errors import ConfigurationError
from outbox.rejection import DLQ_PREFIX as DLQ_PREFIX
from outbox.rejection import QUEUE_PREFIX as QUEUE_PREFIX
from outbox.rejection import dead_letter_queue as dead_letter_queue

#: The virtual topic the CDC relay publishes the fan-out's messages to.
TOPIC = "/topic/VirtualTopic.transfers"

#: The fan-out's consumers, each with its own queue.
CREDIT, AUDIT, SLOW = "credit", "audit", "slow"
CONSUMERS: tuple[str, ...] = (CREDIT, AUDIT, SLOW)


def consumer_queue(name: str) -> str:
    """``/queue/Consumer.<name>.VirtualTopic.transfers``: where consumer ``name`` reads."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigurationError(
            f"fan-out consumer name {name!r}: use letters, digits, '-' and '_' only"
        )
    return f"/queue/Consumer.{name}.{TOPIC.removeprefix('/topic/')}"
