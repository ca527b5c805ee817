"""The consumer: takes transfers off /queue/transfers and credits B, exactly once in effect.

Each message is applied in one local transaction on B: an ``inbox`` row keyed
by the message's ``transfer-id`` header, the credit, and B's ``transfers``
row. A transfer id already in the inbox is a duplicate (a relay's retry or
replay, or a redelivery): it only counts ``duplicates`` and credits nothing.
The messages are acknowledged one by one (``client-individual``) after B's
commit, so a consumer that dies in between gets them redelivered, and the
inbox absorbs them.

Messages arriving together are applied in one B transaction (sorted by target
account, so that two consumers never deadlock) and then acknowledged.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from coordinator.errors import ParticipantError
from coordinator.events import get_logger
from participants.stomp_client import Message, StompClient, Subscription
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.strategies.base import CrashPlan
from scenarios.transfer.model import CREDIT, QUEUE
from scenarios.wiring import open_stomp

#: Environment variable arming a consumer crash: ``after-b-commit=kill@3`` SIGKILLs the
#: consumer after its third B commit, before the acknowledgements.
CONSUMER_CRASH_SETTING = "TWOPC_CONSUMER_CRASH"
CONSUMER_CRASH_POINTS = ("after-b-commit",)

INBOX_INSERT = (
    "INSERT INTO inbox (transfer_id, message_id, outcome) VALUES (%s, %s, %s) "
    "ON CONFLICT (transfer_id) DO UPDATE SET duplicates = inbox.duplicates + 1 "
    "RETURNING (xmax = 0)"  # true for a fresh insert, false when the row was there
)


@dataclass
class ConsumerStats:
    """What a consumer did since it started."""

    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Parsed:
    message: Message
    transfer_id: str
    target: str
    amount: int
    problem: str  # why the message cannot be applied; empty when it can


def parse(message: Message) -> _Parsed:
    """The transfer a message carries; ``problem`` says what is wrong with a bad one."""
    transfer_id = message.headers.get("transfer-id") or message.message_id
    try:
        body = json.loads(message.body)
        target, amount = str(body["to"]), int(body["amount"])
        if str(body["transfer_id"]) != transfer_id:
            return _Parsed(message, transfer_id, "", 0, "rejected: header and body ids differ")
    except (ValueError, KeyError, TypeError):
        return _Parsed(message, transfer_id, "", 0, "rejected: malformed body")
    if amount <= 0:
        return _Parsed(message, transfer_id, target, amount, "rejected: amount must be > 0")
    return _Parsed(message, transfer_id, target, amount, "")


class Consumer:
    """Applies transfers to B from the queue until stopped; reconnects after failures."""

    def __init__(
        self,
        settings: Settings,
        *,
        destination: str = QUEUE,
        prefetch: int = 500,
        batch_size: int = 200,
        name: str = "consumer",
    ) -> None:
        self.settings = settings
        self.destination = destination
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.stats = ConsumerStats()
        self.crashes = CrashPlan("consumer", CONSUMER_CRASH_POINTS)
        self.log = get_logger(component="consumer", consumer=name)
        self._db: psycopg.Connection | None = None
        self._client: StompClient | None = None

    def run(self, stop: threading.Event | None = None) -> ConsumerStats:
        """Consume until ``stop`` is set (checked every 0.25 s)."""
        stop = stop or threading.Event()
        self.crashes.arm_from_env(CONSUMER_CRASH_SETTING)
        self.log.info(ev.CONSUMER_STARTED, destination=self.destination)
        failures = 0
        try:
            while not stop.is_set():
                try:
                    subscription = self._connect()
                    failures = 0
                    while not stop.is_set():
                        batch = self._take(subscription)
                        if batch:
                            self.handle(batch)
                except (ParticipantError, psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    failures += 1
                    self.stats.reconnects += 1
                    self.log.warning(ev.CONSUMER_CONNECTION_LOST, error=str(exc), attempt=failures)
                    self._disconnect()  # unacknowledged messages go back to the queue
                    stop.wait(min(5.0, 0.2 * 2 ** min(failures, 5)))
        finally:
            self._disconnect(graceful=True)
            self.log.info(ev.CONSUMER_STOPPED, **self.stats.as_dict())
        return self.stats

    def _connect(self) -> Subscription:
        self._disconnect()
        self._db = psycopg.connect(self.settings.pg_b)
        self._client = open_stomp(self.settings, participant="consumer-broker")
        return self._client.subscribe(
            self.destination, ack="client-individual", prefetch=self.prefetch
        )

    def _disconnect(self, *, graceful: bool = False) -> None:
        if self._client is not None:
            if graceful:
                self._client.close()
            else:
                self._client.drop()
            self._client = None
        if self._db is not None:
            self._db.close()
            self._db = None

    def _take(self, subscription: Subscription) -> list[Message]:
        first = subscription.get(0.25)
        if first is None:
            return []
        batch = [first]
        while len(batch) < self.batch_size:
            more = subscription.get(0)
            if more is None:
                break
            batch.append(more)
        return batch

    def handle(self, batch: Sequence[Message]) -> None:
        """Apply ``batch`` in one B transaction, then acknowledge every message."""
        if self._db is None or self._client is None:
            raise RuntimeError("the consumer is not connected")
        outcomes = apply(self._db, batch)
        self.stats.batches += 1
        for outcome in outcomes:
            if outcome == "applied":
                self.stats.applied += 1
            elif outcome == "duplicate":
                self.stats.duplicates += 1
            else:
                self.stats.rejected += 1
                self.log.error(ev.CONSUMER_REJECTED, outcome=outcome)
        if self.crashes.hit("after-b-commit"):
            # As if the process died here: no ACK, so the broker redelivers the batch.
            raise ParticipantError("crash injected after B's commit", participant="consumer")
        for message in batch:
            self._client.ack(message)
        self.log.debug(ev.CONSUMER_BATCH, messages=len(batch))


def apply(db: psycopg.Connection, batch: Sequence[Message]) -> list[str]:
    """Apply ``batch`` to B in one transaction; each message's outcome, in batch order.

    Outcomes: ``applied``, ``duplicate`` (its transfer id was in the inbox),
    or ``rejected: ...`` (recorded in the inbox, never credited).
    """
    parsed = [parse(m) for m in batch]
    outcomes: dict[int, str] = {}
    seen: set[str] = set()
    order = sorted(range(len(parsed)), key=lambda i: (parsed[i].target, parsed[i].transfer_id))
    with db.transaction(), db.cursor() as cur:
        for i in order:
            item = parsed[i]
            if item.transfer_id in seen:  # the same id twice in one batch
                cur.execute(INBOX_INSERT, (item.transfer_id, item.message.message_id, "applied"))
                outcomes[i] = "duplicate"
                continue
            seen.add(item.transfer_id)
            cur.execute(
                INBOX_INSERT,
                (item.transfer_id, item.message.message_id, item.problem or "applied"),
            )
            row = cur.fetchone()
            if not (row and row[0]):
                outcomes[i] = "duplicate"
                continue
            if item.problem:
                outcomes[i] = item.problem
                continue
            cur.execute(
                CREDIT,
                {"amount": item.amount, "account": item.target, "tid": item.transfer_id},
            )
            if cur.rowcount != 1:
                outcomes[i] = f"rejected: no account {item.target} in B"
                cur.execute(
                    "UPDATE inbox SET outcome = %s WHERE transfer_id = %s",
                    (outcomes[i], item.transfer_id),
                )
                continue
            outcomes[i] = "applied"
    return [outcomes[i] for i in range(len(parsed))]


def inbox_counts(dsn: str) -> dict[str, Any]:
    """Rows, duplicates absorbed and rejections in B's inbox (for reports and tests)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(duplicates), 0), "
            "count(*) FILTER (WHERE outcome <> 'applied') FROM inbox"
        ).fetchone()
    rows, duplicates, rejected = row if row else (0, 0, 0)
    return {"rows": int(rows), "duplicates": int(duplicates), "rejected": int(rejected)}
