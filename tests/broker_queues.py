"""The tests' own queues on the lab's broker: each named under the lab's test prefix, one
per test or example, and emptied when a session on a lab that outlives it ends
(tests/conftest.py).

Emptied, such a queue is removed by the broker once it has been idle for a while (the
lab's activemq.xml, scenarios/lab/templates.py): a lab that serves many runs does not
keep thousands of queues in its heap.
"""

from __future__ import annotations

import uuid

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
