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

``cdc-fanout`` has the relay publish to the virtual topic
``/topic/VirtualTopic.transfers`` instead: each change once, and every
consumer queue gets a copy (scenarios.outbox.fanout).
"""

from __future__ import annotations

from collections.abc import Callable

from scenarios.config import Settings
from scenarios.outbox.cdc import ensure_slot, set_destination
from scenarios.outbox.fanout import ensure_queues
from scenarios.strategies.outbox import LocalCommitWriter
from scenarios.transfer.destinations import CONSUMERS, TOPIC
from scenarios.transfer.model import CREDIT_QUEUE


class CdcStrategy(LocalCommitWriter):
    """A local commit in A; the CDC relay turns the committed rows into the message."""

    #: The consumers of a fan-out (none: the one consumer of /queue/transfers.credit).
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
    """CDC published once to the virtual topic; credit, audit and slow consumers each read
    their own queue (scenarios.outbox.fanout)."""

    def __init__(self, *, before_commit: Callable[[], None] | None = None) -> None:
        super().__init__(before_commit=before_commit, name="cdc-fanout", destination=TOPIC)
        self.fanout = CONSUMERS

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        ensure_queues(settings, self.fanout)  # a queue created later misses what came before
        super().prepare(settings, concurrency=concurrency)
