"""The CDC strategy: A's local commit writes a cdc_events row that the CDC relay reads from the WAL.

The writer is the outbox writer with another table: nobody reads
``cdc_events`` with SQL. The CDC relay (scenarios.outbox.relay) decodes its
inserts from the logical replication slot ``twopc_cdc``, so the slot must
exist before the first write: prepare() creates it with
:func:`scenarios.outbox.cdc.ensure_slot`.

``cdc-fanout`` writes the same rows with the virtual topic
``/topic/VirtualTopic.transfers`` as destination: the relay publishes each
change once and every consumer queue gets a copy (scenarios.outbox.fanout).
"""

from __future__ import annotations

from collections.abc import Callable

from scenarios.config import Settings
from scenarios.outbox.cdc import ensure_slot
from scenarios.outbox.fanout import ensure_queues
from scenarios.strategies.outbox import LocalCommitWriter
from scenarios.transfer.destinations import CONSUMERS, TOPIC

CDC_INSERT = (
    "INSERT INTO cdc_events (transfer_id, destination, body) "
    "VALUES (%(tid)s, %(destination)s, %(body)s)"
)


class CdcStrategy(LocalCommitWriter):
    """A local commit in A; the CDC relay turns the committed insert into the message."""

    #: The consumers of a fan-out (none: the one consumer of /queue/transfers.credit).
    fanout: tuple[str, ...] = ()

    def __init__(self, *, before_commit: Callable[[], None] | None = None) -> None:
        super().__init__("cdc", "cdc", CDC_INSERT, before_commit=before_commit)

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        ensure_slot(settings.pg_a)
        super().prepare(settings, concurrency=concurrency)


class CdcFanoutStrategy(CdcStrategy):
    """CDC published once to the virtual topic; credit, audit and slow consumers each read
    their own queue (scenarios.outbox.fanout)."""

    def __init__(self, *, before_commit: Callable[[], None] | None = None) -> None:
        LocalCommitWriter.__init__(
            self,
            "cdc-fanout",
            "cdc",
            CDC_INSERT,
            destination=TOPIC,
            before_commit=before_commit,
        )
        self.fanout = CONSUMERS

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        ensure_queues(settings, self.fanout)  # a queue created later misses what came before
        super().prepare(settings, concurrency=concurrency)
