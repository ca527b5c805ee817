"""Broker destinations the transfer scenario names: a queue's dead-letter queue, and the
CDC fan-out's virtual topic, its consumers and the queue each reads.

See scenarios.outbox.deadletter for what goes to a dead-letter queue, and
scenarios.outbox.fanout for how the broker copies the topic's messages into each
consumer's queue.
"""

from __future__ import annotations

from coordinator.errors import ConfigurationError

QUEUE_PREFIX = "/queue/"
DLQ_PREFIX = "/queue/DLQ."


def dead_letter_queue(destination: str) -> str:
    """``/queue/DLQ.<name>`` for the queue ``/queue/<name>``."""
    name = destination.removeprefix(QUEUE_PREFIX)
    if name == destination or not name or destination.startswith(DLQ_PREFIX):
        raise ConfigurationError(
            f"no dead-letter queue for {destination!r}: it must be a /queue/<name> "
            "that is not itself a dead-letter queue"
        )
    return DLQ_PREFIX + name


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
