"""The transactional outbox as a component: for an application that picks it over 2PC.

Beside the coordinator, for a team whose service writes a PostgreSQL database
and must tell a STOMP broker about it without a distributed transaction:

* :mod:`outbox.writer` / :mod:`outbox.aio.writer`: add a message to the
  application's own psycopg transaction (sync and asyncio);
* :mod:`outbox.relay`: publish committed messages to the broker (``status``
  and ``last-id`` modes, LISTEN/NOTIFY wake-up, the failure policies of
  :mod:`outbox.failures`, clean-up of relayed rows);
* :mod:`outbox.inbox` / :mod:`outbox.consumer`: apply each message once, the
  handler run in the same transaction as the inbox row that deduplicates it;
  what cannot be applied goes to a dead-letter queue (:mod:`outbox.deadletter`);
* :mod:`outbox.tables`: the tables they use, their names and the DDL;
* :mod:`outbox.clean`: delete relayed rows in batches, never past a relay's position.

docs/outbox.md describes it with an example; docs/design.md §8 explains the modes.
"""

from outbox.message import OutboxMessage
from outbox.tables import Tables

__all__ = ["OutboxMessage", "Tables"]
