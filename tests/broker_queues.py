"""The tests' own queues on the lab's broker: each named under the lab's test prefix, one
per test or example, and emptied when a session on a lab that outlives it ends.

Emptied, such a queue is removed by the broker once it has been idle for a while (the
lab's activemq.xml, scenarios/lab/templates.py): a lab that serves many runs does not
keep thousands of queues in its heap.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable

from participants.stomp_client import StompClient
from participants.stomp_core import Message
from scenarios.lab.templates import TEST_QUEUE_PREFIX

#: Every queue fresh_queue() named in this process, in order.
_NAMED: list[str] = []


def fresh_queue(kind: str = "q") -> str:
    """A queue no other test uses, ``/queue/test.<kind>.<random>``, to be emptied later."""
    name = f"/queue/{TEST_QUEUE_PREFIX}{kind}.{uuid.uuid4().hex[:12]}"
    _NAMED.append(name)
    return name


def named_queues() -> list[str]:
    """The queues fresh_queue() named in this process."""
    return list(_NAMED)


def empty_queues(client: StompClient, queues: Iterable[str], *, idle: float = 1.0) -> int:
    """Consume and drop every message on ``queues``; return how many.

    One subscription per queue on ``client``, all at once: the messages flow in together,
    and the wait ends once none has come for ``idle`` seconds.
    """
    received = 0
    arrived = threading.Condition()

    def count(_: Message) -> None:
        nonlocal received
        with arrived:
            received += 1
            arrived.notify_all()

    subscriptions = [
        client.subscribe(queue, ack="auto", prefetch=1000, on_message=count) for queue in queues
    ]
    with arrived:
        seen = -1
        while seen != received:
            seen = received
            arrived.wait(idle)
        total = received
    for subscription in subscriptions:
        subscription.unsubscribe(timeout=5.0)
    return total
