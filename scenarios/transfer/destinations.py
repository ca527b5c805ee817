"""Broker destinations the transfer scenario names: the events' virtual topic, its consumers
and the queue each reads, the kind each destination carries, and a queue's dead-letter queue.

Events ("this happened", many consumers) are published to the virtual topic
:data:`TOPIC`; the broker copies each into every queue
``/queue/Consumer.<name>.VirtualTopic.transfers`` that exists at that moment.
Commands ("do this", one receiver) go to the one queue of their receiver
(``/queue/transfers.credit``). See docs/design.md §8, scenarios.outbox.deadletter
for what goes to a dead-letter queue, and scenarios.outbox.fanout for the consumers.
"""

from __future__ import annotations

from coordinator.errors import ConfigurationError
from outbox.rejection import DLQ_PREFIX as DLQ_PREFIX
from outbox.rejection import QUEUE_PREFIX as QUEUE_PREFIX
from outbox.rejection import dead_letter_queue as dead_letter_queue

TOPIC_PREFIX = "/topic/"


#: The virtual topic of the transfer events (``transfer.completed``, ``transfer.refused``):
#: 2PC, the naive dual write, the thread pool and the CDC fan-out's relay publish there.
TOPIC = "/topic/VirtualTopic.transfers"

#: The fan-out's event consumers, each with its own queue of TOPIC and its own pace.
AUDIT, NOTIFICATION, SLOW = "audit", "notification", "slow"
CONSUMERS: tuple[str, ...] = (AUDIT, NOTIFICATION, SLOW)

#: The credit command's one receiver (the inbox consumer on /queue/transfers.credit), named
#: beside the event consumers where their progress is compared (scenarios.outbox.fanout).
CREDIT = "credit"

#: The queue of TOPIC the invariant checks read (a browse) and the crash torture consumes
#: (its ledger): every event once. Created with the others before the first event.
LEDGER = "ledger"

#: Every queue of TOPIC the scenario creates before its first write.
EVENT_QUEUES: tuple[str, ...] = (LEDGER, *CONSUMERS)


def consumer_queue(name: str) -> str:
    """``/queue/Consumer.<name>.VirtualTopic.transfers``: where consumer ``name`` reads."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigurationError(
            f"fan-out consumer name {name!r}: use letters, digits, '-' and '_' only"
        )
    return f"{QUEUE_PREFIX}Consumer.{name}.{TOPIC.removeprefix(TOPIC_PREFIX)}"


#: The queue the invariant checks read the events from.
LEDGER_QUEUE = consumer_queue(LEDGER)


def carries_events(destination: str) -> bool:
    """Whether ``destination`` carries events: a topic, or a consumer queue of a virtual topic.

    Every other queue carries the commands of its one receiver.
    """
    if destination.startswith(TOPIC_PREFIX):
        return True
    name = destination.removeprefix(QUEUE_PREFIX)
    return name != destination and name.startswith("Consumer.") and ".VirtualTopic." in name


def recorded_destinations(recorded: str) -> list[str]:
    """The destinations of a relay's recorded destination: one, or several comma-separated
    (the CDC fan-out: the credit command's queue and the events' topic)."""
    return [d.strip() for d in recorded.split(",") if d.strip()]
