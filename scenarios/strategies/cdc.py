"""The CDC strategy: A's local commit is the debit alone; the CDC relay reads it from the WAL.

The writer runs the business transaction and nothing else (the grep test in
tests/test_cdc.py holds it to that): the debit of the source account and A's
``transfers`` row, which names the account to credit in B. The CDC relay
(scenarios.outbox.relay) decodes those rows from the logical replication slot
``twopc_cdc`` (pgoutput, publication ``twopc_cdc``) and turns each committed
transfer into the credit command (scenarios.outbox.cdc.explain). The slot
must exist before the first write: prepare() creates it with
:func:`scenarios.outbox.cdc.ensure_slot`, and tells the relay where to
publish (``relay_positions.destination``).

``cdc-fanout`` has the relay publish two messages per transfer, in one broker
transaction: the credit command to B's one queue, as ``cdc`` does, and the
``transfer.completed`` event to the virtual topic ``/topic/VirtualTopic.transfers``,
of which every event consumer's queue gets a copy (scenarios.outbox.fanout).
Commands have one receiver; events suit many consumers.
"""

from __future__ import annotations

from collections.abc import Callable

from scenarios.config import Settings
from scenarios.outbox.cdc import ensure_slot, set_destination
from scenarios.outbox.fanout import ensure_queues
from scenarios.strategies.outbox import LocalCommitWriter
from scenarios.transfer.destinations import CONSUMERS, EVENT_QUEUES, TOPIC
from scenarios.transfer.model import CREDIT_QUEUE


class CdcStrategy(LocalCommitWriter):
    """A local commit in A; the CDC relay turns the committed rows into the message."""

    #: The event consumers of a fan-out, besides the credit command's one receiver (none).
    fanout: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        before_commit: Callable[[], None] | None = None,
        name: str = "cdc",
        destination: str = CREDIT_QUEUE,
    ) -> None:
        super().__init__(name, "cdc", None, destination=destination, before_commit=before_commit)

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        ensure_slot(settings.pg_a)
        set_destination(settings.pg_a, self.destination)
        super().prepare(settings, concurrency=concurrency)


class CdcFanoutStrategy(CdcStrategy):
    """CDC's credit command to B's one queue, and its event once to the virtual topic, which
    the audit, notification and slow consumers each read from their own queue
    (scenarios.outbox.fanout)."""

    def __init__(self, *, before_commit: Callable[[], None] | None = None) -> None:
        super().__init__(
            before_commit=before_commit,
            name="cdc-fanout",
            destination=f"{CREDIT_QUEUE},{TOPIC}",
        )
        self.fanout = CONSUMERS

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        ensure_queues(settings, EVENT_QUEUES)  # a queue created later misses the events before
        super().prepare(settings, concurrency=concurrency)
