"""The events' fan-out: each transfer event published once to a virtual topic, read by many
consumers at their own pace.

Events ("this happened") suit many consumers; a command ("do this") has one
receiver (docs/design.md §8). So the transfer events, ``transfer.completed``
and ``transfer.refused``, go to :data:`TOPIC`, an ActiveMQ 5 *virtual topic*:
2PC, the naive dual write and the thread pool publish there, and so does the
CDC relay of ``cdc-fanout`` (scenarios.strategies.cdc), which decodes each
transfer A committed and publishes its event there and its credit command to
B's one queue, ``/queue/transfers.credit``, in one broker transaction. The
broker's default virtual destination interceptor (no configuration needed:
the lab's activemq.xml declares no interceptors, so the default
``VirtualTopic.>`` one applies) copies every message sent to
``/topic/VirtualTopic.transfers`` into each queue named
``/queue/Consumer.<name>.VirtualTopic.transfers`` that exists at that moment,
and only when the sender's transaction commits (tests/test_fanout.py checks
both on the lab).

So each consumer has a durable queue of its own, and its position is that
queue, kept by the broker:

* a consumer killed and restarted resumes from its queue (what it had not
  acknowledged is redelivered, and it is idempotent);
* a slow consumer's backlog grows in its own queue only. The lab's queues have
  ``producerFlowControl="false"``, so a long queue spills to the store rather
  than blocking the senders, which would hold up every consumer;
* a queue that does not exist yet receives nothing: :func:`ensure_queues`
  creates them (a SUBSCRIBE creates a queue) before the first write.

The event consumers (:data:`CONSUMERS`), each writing B's ``audit_log`` under
its own name, keyed by (consumer, transfer id): a redelivery only counts a
duplicate. They take ``transfer.completed`` and ``transfer.refused`` events
and dead-letter anything else, a command first of all
(scenarios.outbox.consumer.event_problem):

``audit``
    Records every event.
``notification``
    The same, standing for the service that tells the account holders.
``slow``
    One message at a time, waiting :data:`SLOW_DELAY_SETTING` seconds (default
    :data:`DEFAULT_SLOW_DELAY`) before each.

The ledger's queue (``Consumer.ledger...``) has no consumer here: the invariant
checks browse it, and the crash torture consumes it (scenarios.torture.ledger).

B's credit is the command's: :data:`CREDIT` names its one receiver, the inbox
consumer on ``/queue/transfers.credit``, where the consumers' progress is
compared. Each consumer's lag is measured from the client's commit on A to its
processing (``inbox.applied_at`` or ``audit_log.processed_at``):
:func:`fanout_lags`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import psycopg

from coordinator.errors import ConfigurationError
from participants.stomp_client import Message
from scenarios.config import Settings
from scenarios.outbox.consumer import (
    APPLIED,
    DUPLICATE,
    Consumer,
    _Stopped,
    event_problem,
)
from scenarios.transfer.destinations import (  # the fan-out's names, re-exported here
    AUDIT as AUDIT,
)
from scenarios.transfer.destinations import (
    CONSUMERS as CONSUMERS,
)
from scenarios.transfer.destinations import (
    CREDIT as CREDIT,
)
from scenarios.transfer.destinations import (
    EVENT_QUEUES as EVENT_QUEUES,
)
from scenarios.transfer.destinations import (
    LEDGER as LEDGER,
)
from scenarios.transfer.destinations import (
    NOTIFICATION as NOTIFICATION,
)
from scenarios.transfer.destinations import (
    SLOW as SLOW,
)
from scenarios.transfer.destinations import (
    TOPIC as TOPIC,
)
from scenarios.transfer.destinations import (
    consumer_queue as consumer_queue,
)
from scenarios.transfer.model import TYPE_HEADER
from scenarios.wiring import open_stomp

#: Whose progress the fan-out watches: the credit command's receiver, then the event consumers.
WATCHED: tuple[str, ...] = (CREDIT, *CONSUMERS)

#: Seconds the slow consumer waits before each message.
SLOW_DELAY_SETTING = "TWOPC_FANOUT_SLOW_DELAY"
DEFAULT_SLOW_DELAY = 0.02

AUDIT_INSERT = (
    "INSERT INTO audit_log (consumer, transfer_id, message_id, kind, body) "
    "VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (consumer, transfer_id) DO UPDATE SET duplicates = audit_log.duplicates + 1 "
    "RETURNING (xmax = 0)"  # true for a fresh insert, false when the row was there
)


def slow_delay() -> float:
    """The slow consumer's delay per message, from TWOPC_FANOUT_SLOW_DELAY (seconds)."""
    raw = os.environ.get(SLOW_DELAY_SETTING, "")
    try:
        delay = float(raw) if raw else DEFAULT_SLOW_DELAY
    except ValueError:
        delay = -1.0
    if not 0 <= delay <= 60:
        raise ConfigurationError(f"{SLOW_DELAY_SETTING}={raw!r}: seconds between 0 and 60")
    return delay


def ensure_queues(settings: Settings, names: Iterable[str] = EVENT_QUEUES) -> None:
    """Create each consumer's queue of the events' topic (a SUBSCRIBE creates it), so that
    none misses an event; by default the ledger's and the event consumers'.

    The UNSUBSCRIBE's receipt says the broker has processed the SUBSCRIBE.
    """
    with open_stomp(settings, participant="fanout-broker") as client:
        for name in names:
            client.subscribe(consumer_queue(name), ack="client-individual", prefetch=1).unsubscribe(
                timeout=5.0
            )


class AuditConsumer(Consumer):
    """Writes every transfer event to B's audit_log, once per (consumer, transfer)."""

    def __init__(
        self, settings: Settings, name: str = AUDIT, *, prefetch: int = 500, batch_size: int = 200
    ) -> None:
        super().__init__(
            settings,
            destination=consumer_queue(name),
            name=name,
            prefetch=prefetch,
            batch_size=batch_size,
        )

    def problem_of(self, message: Message) -> str:
        """Events only (``transfer.completed``, ``transfer.refused``): a command that came
        through the topic, no kind, an unknown kind or no transfer id is dead-lettered."""
        return event_problem(message)

    def apply_batch(self, db: psycopg.Connection, messages: Sequence[Message]) -> list[str]:
        outcomes: list[str] = []
        with db.transaction(), db.cursor() as cur:
            for message in messages:
                cur.execute(
                    AUDIT_INSERT,
                    (
                        self.name,
                        message.headers["transfer-id"],
                        message.message_id,
                        message.headers.get(TYPE_HEADER, ""),
                        message.body,
                    ),
                )
                row = cur.fetchone()
                outcomes.append(APPLIED if row and row[0] else DUPLICATE)
        return outcomes


class SlowConsumer(AuditConsumer):
    """The audit log, one message at a time, ``delay`` seconds before each: a slow reader."""

    def __init__(self, settings: Settings, name: str = SLOW, *, delay: float = 0.0) -> None:
        super().__init__(settings, name, prefetch=1, batch_size=1)
        self.delay = delay

    def apply_batch(self, db: psycopg.Connection, messages: Sequence[Message]) -> list[str]:
        if self._stop.wait(self.delay * len(messages)):
            raise _Stopped()  # unacknowledged: redelivered to the next run
        return super().apply_batch(db, messages)


def make_consumer(settings: Settings, name: str, *, delay: float | None = None) -> Consumer:
    """The event consumer called ``name``: slow, or (any other name) an audit log.

    ``credit`` and ``ledger`` are refused: B's credit is a command with one receiver
    (``twopc consumer``), and the ledger's queue is the checks' (docs/design.md §8).
    """
    if name == CREDIT:
        raise ConfigurationError(
            "consumer 'credit': B's credit is a command on /queue/transfers.credit with one "
            "receiver, not an event: run 'twopc consumer'"
        )
    if name == LEDGER:
        raise ConfigurationError(
            "consumer 'ledger': its queue is read by the invariant checks; pick another name"
        )
    if name == SLOW:
        return SlowConsumer(settings, name, delay=slow_delay() if delay is None else delay)
    return AuditConsumer(settings, name)


# -- watching them ---------------------------------------------------------------------


def _processed(conn: psycopg.Connection, name: str, ids: list[str]) -> list[tuple[str, float]]:
    """(transfer id, epoch of processing) of ``ids`` that consumer ``name`` has processed."""
    if name == CREDIT:
        query = (
            "SELECT transfer_id, extract(epoch FROM applied_at)::float8 FROM inbox "
            "WHERE transfer_id = ANY(%s)"
        )
        rows = conn.execute(query, (ids,)).fetchall()
    else:
        query = (
            "SELECT transfer_id, extract(epoch FROM processed_at)::float8 FROM audit_log "
            "WHERE consumer = %s AND transfer_id = ANY(%s)"
        )
        rows = conn.execute(query, (name, ids)).fetchall()
    return [(str(tid), float(at)) for tid, at in rows]


def wait_all(
    settings: Settings,
    ids: Iterable[str],
    names: Iterable[str] = WATCHED,
    *,
    timeout: float = 60.0,
    check: Callable[[], None] | None = None,
) -> dict[str, set[str]]:
    """Wait until every consumer has processed ``ids``; per consumer, what is still missing."""
    wanted = list(set(ids))
    deadline = time.monotonic() + timeout
    with psycopg.connect(settings.pg_b, autocommit=True) as conn:
        while True:
            missing = {
                name: set(wanted) - {tid for tid, _ in _processed(conn, name, wanted)}
                for name in names
            }
            if not any(missing.values()) or time.monotonic() >= deadline:
                return missing
            if check is not None:
                check()
            time.sleep(0.05)


def processed_counts(
    settings: Settings, ids: Iterable[str], names: Iterable[str] = WATCHED
) -> dict[str, int]:
    """How many of ``ids`` each consumer has processed so far."""
    wanted = list(set(ids))
    with psycopg.connect(settings.pg_b, autocommit=True) as conn:
        return {name: len(_processed(conn, name, wanted)) for name in names}


def fanout_lags(
    settings: Settings, committed_at: Mapping[str, float], names: Iterable[str] = WATCHED
) -> dict[str, dict[str, float]]:
    """consumer -> transfer id -> ms from the client's commit on A to the consumer's processing."""
    ids = list(committed_at)
    with psycopg.connect(settings.pg_b, autocommit=True) as conn:
        return {
            name: {
                tid: max(0.0, (at - committed_at[tid]) * 1000)
                for tid, at in _processed(conn, name, ids)
            }
            for name in names
        }


def duplicate_effects(settings: Settings) -> int:
    """Rows of audit_log or inbox that exist twice for one (consumer, transfer): always 0.

    The primary keys forbid it; this reads it back as evidence. Redeliveries show
    as ``duplicates`` counts instead.
    """
    with psycopg.connect(settings.pg_b) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) - count(DISTINCT (consumer, transfer_id)) FROM audit_log)"
            " + (SELECT count(*) - count(DISTINCT transfer_id) FROM inbox)"
        ).fetchone()
    return int(row[0]) if row else 0
