"""The consumer inside a global transaction (``twopc consumer --mode 2pc [--asyncio]``): no inbox.

Written once, for asyncio (``scenarios/outbox/consumer_2pc_aio.py``), from
which ``scripts/unasync.py`` generates the thread version
(``scenarios/outbox/consumer_2pc.py``). Both share the coordinator id and
decision log of scenarios.wiring.open_consuming_coordinator, so either one
recovers what the other left when it died.

Credit commands are applied in batches, each in one global transaction
(docs/design.md §8):

1. up to ``batch_size`` messages are taken off a ``client-individual``
   subscription of the coordinator's one broker session, waiting at most
   ``max_wait`` after the first for the others;
2. their credits run on B in one XA branch, sorted by target account, after
   one query for the transfers B holds already (a relay's duplicate is
   acknowledged and credits nothing);
3. every message's ACK goes out inside the broker transaction;
4. the coordinator commits: PREPARE on B, then the broker's COMMIT carrying
   the ACKs and one commit marker naming the batch's gtrid (the commit point),
   then COMMIT PREPARED.

A crash before the broker's COMMIT leaves the messages on the queue (the
broker drops uncommitted ACKs with their connection) and B's branch, if
prepared, without a marker: recovery rolls it back. A crash after it leaves
the messages consumed and the marker on the marker queue: recovery commits B.
The consumer runs its coordinator's recovery when it starts.

Poison messages never hold a batch back. One rejected unread (another
``type``, a malformed body) is dead-lettered as in the inbox consumer; one B
refuses (a missing account, a constraint of B) rolls its batch's transaction
back before any ACK went out, is dead-lettered, and the rest of the batch is
applied again without it. A transaction that aborts for another reason (B
unreachable, a refused COMMIT) drops the connection, so that its messages come
back; each of them is then tried in a transaction of its own, and after
``max_attempts`` tries it is dead-lettered.
"""

from __future__ import annotations

import threading
import time

import psycopg

from coordinator import tracing
from coordinator.aio import AsyncCoordinator
from coordinator.aio.transaction import AsyncTransaction
from coordinator.compat import arun_main, asleep
from coordinator.errors import ParticipantError, TwoPhaseCommitError
from coordinator.states import Outcome
from participants.aio.stomp import AsyncSubscription
from participants.stomp_client import Message
from scenarios import events as ev
from scenarios.outbox.consumer import CONSUMER_CRASH_SETTING, ConsumerFailed, _Parsed
from scenarios.outbox.consumer_2pc_batch import (
    ALREADY_CREDITED,
    CREDIT_BATCH,
    REFUSALS,
    Batch,
    Consumer2pcStats,
    Redeliver,
    TwoPhaseConsumerBase,
    credit_batch,
    credit_order,
    item_credit,
    refusal_reason,
)
from scenarios.outbox.deadletter import dead_letter_async, one_line
from scenarios.transfer.model import CREDIT, MissingAccount
from scenarios.wiring import open_consuming_async_coordinator

#: How often the consumer looks at its stop event while it waits for a message.
POLL = 0.25


class _Split(Exception):
    """B refused the credits of a batch in one statement: rolled back, to be applied one
    statement per credit to find which one it refuses."""


class _Refused(Exception):
    """B refused one credit of a batch: its transaction was rolled back."""

    def __init__(self, item: _Parsed, reason: str) -> None:
        super().__init__(reason)
        self.item = item
        self.reason = reason


class AsyncTwoPhaseConsumer(TwoPhaseConsumerBase):
    """Applies credit commands to B in batches, each in one global transaction, until stopped."""

    def run(self, stop: threading.Event | None = None) -> Consumer2pcStats:
        """Consume until ``stop`` is set (looked at every 0.25 s); ConsumerFailed if it cannot."""
        return arun_main(self.consume, stop or threading.Event())

    async def consume(self, stop: threading.Event) -> Consumer2pcStats:
        """Consume until ``stop`` is set (looked at every 0.25 s)."""
        self.crashes.arm_from_env(CONSUMER_CRASH_SETTING)
        coordinator, broker = open_consuming_async_coordinator(self.settings)
        await coordinator.start()
        self._report_recovery(coordinator.last_recovery)
        self.log.info(
            ev.CONSUMER_STARTED,
            destination=self.destination,
            mode="2pc",
            batch_size=self.batch_size,
            max_wait_ms=self.max_wait * 1000,
        )
        failures = 0
        try:
            while not stop.is_set():
                try:
                    subscription = await broker.subscribe(self.destination, prefetch=self.prefetch)
                    failures = 0
                    while not stop.is_set():
                        messages = await self._take(subscription)
                        if messages:
                            await self.handle(coordinator, subscription, messages)
                except (ParticipantError, psycopg.OperationalError, Redeliver) as exc:
                    failures += 1
                    self.stats.reconnects += 1
                    self.log.warning(
                        ev.CONSUMER_CONNECTION_LOST, error=one_line(str(exc)), attempt=failures
                    )
                    deadline = time.monotonic() + self._delay(failures)
                    while not stop.is_set() and time.monotonic() < deadline:
                        await asleep(min(POLL, deadline - time.monotonic()))
        except ConsumerFailed as exc:
            self.log.error(ev.CONSUMER_FAILED, error=str(exc))
            raise
        except Exception as exc:
            failed = ConsumerFailed(f"the consumer stopped: {type(exc).__name__}: {exc}")
            self.log.error(ev.CONSUMER_FAILED, error=one_line(str(failed)))
            raise failed from exc
        finally:
            await coordinator.close()
            self.log.info(ev.CONSUMER_STOPPED, **self.stats.as_dict())
        return self.stats

    async def _take(self, subscription: AsyncSubscription) -> list[Message]:
        """The next batch: the first message (waiting up to POLL), then what comes within
        ``max_wait``, up to ``batch_size``."""
        first = await subscription.get(POLL)
        if first is None:
            return []
        messages = [first]
        deadline = time.monotonic() + self.max_wait
        while len(messages) < self.batch_size:
            more = await subscription.get(max(0.0, deadline - time.monotonic()))
            if more is None:
                break
            messages.append(more)
        return messages

    async def handle(
        self,
        coordinator: AsyncCoordinator,
        subscription: AsyncSubscription,
        messages: list[Message],
    ) -> None:
        """Apply a batch in one global transaction, dead-letter what cannot be applied.

        With tracing, each message's span continues its sender's trace, and the
        global transaction is a child of the first message's span.
        """
        attributes = {"twopc.consumer": "consumer-2pc", "messaging.destination": self.destination}
        spans = tracing.continue_each(
            "twopc.consume", (m.headers for m in messages[1:]), **attributes
        )
        try:
            with tracing.continued("twopc.consume", messages[0].headers, **attributes):
                await self._handle(coordinator, subscription, self._sort(messages))
        finally:
            tracing.end_all(spans)

    async def _handle(
        self, coordinator: AsyncCoordinator, subscription: AsyncSubscription, batch: Batch
    ) -> None:
        if batch.commands or batch.sentinels:
            self.crashes.hit("after-receipt")
        # The batch, then each command that failed before in a transaction of its own.
        groups = [(batch.commands, batch.sentinels), *(([item], []) for item in batch.alone)]
        for items, sentinels in groups:
            one_by_one = len(items) == 1
            while items or sentinels:
                try:
                    missing = await self._apply(
                        coordinator, subscription, items, sentinels, batch.taken_at, one_by_one
                    )
                except _Split:
                    one_by_one = True  # find the credit B refuses: one statement each
                    continue
                except _Refused as refused:
                    items = [item for item in items if item is not refused.item]
                    batch.rejections.append(self._rejection(refused.item, refused.reason))
                    continue
                batch.rejections += [
                    self._rejection(item, refusal_reason(MissingAccount(item.target, "b"), item))
                    for item in missing
                ]
                break
        if batch.rejections:
            await dead_letter_async(
                subscription.client, batch.rejections, destination=self.destination
            )
            self._dead_lettered(batch.rejections)

    async def _apply(
        self,
        coordinator: AsyncCoordinator,
        subscription: AsyncSubscription,
        items: list[_Parsed],
        sentinels: list[Message],
        started: float,
        one_by_one: bool,
    ) -> list[_Parsed]:
        """One global transaction: the credits of ``items`` on B, the ACKs in the broker's
        transaction, then the commit; the items whose account B does not have (nothing
        written for them, not ACKed). _Split or _Refused (rolled back, nothing ACKed) if B
        refuses a credit; Redeliver (the connection dropped) if it does not commit."""
        self._attempting(items)
        tx = coordinator.begin()
        duplicates: set[str] = set()
        missing: list[_Parsed] = []
        refused: set[str] = set()
        try:
            if items:
                duplicates, missing = await self._credit(tx, items, one_by_one)
            # BEGIN and every ACK in one write (sent when the block ends).
            refused = {item.message.message_id for item in missing}
            async with subscription.client.corked():
                for message in sentinels:  # left by a browse: consumed, nothing applied
                    await tx.ack(message.ack_id)
                for item in items:
                    if item.message.message_id not in refused:
                        await tx.ack(item.message.ack_id)
        except (_Split, _Refused) as exc:
            await tx.rollback(f"{_what(items)}: {exc}")
            raise
        except (psycopg.OperationalError, psycopg.InterfaceError, ParticipantError) as exc:
            await tx.rollback(f"{_what(items)}: {exc}")
            subscription.client.drop()
            raise self._aborted(items, tx.gtrid, str(exc)) from exc
        except TwoPhaseCommitError as exc:
            await tx.rollback(f"{_what(items)}: {exc}")
            raise ConsumerFailed(
                f"the consumer stopped: {_what(items)} (gtrid {tx.gtrid}): {exc}"
            ) from exc
        except psycopg.Error as exc:
            await tx.rollback(f"{_what(items)}: {exc}")
            raise ConsumerFailed(
                f"the consumer stopped: applying {_what(items)} to B in gtrid {tx.gtrid} failed "
                f"with {type(exc).__name__}: {one_line(str(exc), 300)}"
            ) from exc
        outcome = await tx.commit()
        applied = [item for item in items if item.message.message_id not in refused]
        if outcome is Outcome.COMMITTED:
            self._applied(applied, duplicates, tx.gtrid, started)
            return missing
        if outcome is Outcome.IN_DOUBT:
            self._left_in_doubt(applied, tx.gtrid, tx.reason)
            return []  # consumed with B committed, or back on the queue
        subscription.client.drop()
        raise self._aborted(items, tx.gtrid, tx.reason or "aborted")

    async def _credit(
        self, tx: AsyncTransaction, items: list[_Parsed], one_by_one: bool
    ) -> tuple[set[str], list[_Parsed]]:
        """Credit B in the transaction's branch: the message ids of the duplicates (B held
        their transfer already, or the batch had it twice) and the items whose account B
        does not have. _Split (all in one statement) or _Refused (one by one) if B refuses
        a credit: the branch then votes NO."""
        b = await tx.branch("b")
        found = await b.execute(ALREADY_CREDITED, ([item.transfer_id for item in items],))
        held = {row[0] for row in await found.fetchall()}
        duplicates: set[str] = set()
        todo: list[_Parsed] = []
        for item in credit_order(items):
            if item.transfer_id in held:
                duplicates.add(item.message.message_id)
            else:
                held.add(item.transfer_id)
                todo.append(item)
        credited: set[str] = set()
        if todo and not one_by_one:
            try:
                cursor = await b.execute(CREDIT_BATCH, credit_batch(todo))
            except REFUSALS as exc:
                raise _Split(one_line(str(exc), 200)) from exc
            credited = {row[0] for row in await cursor.fetchall()}
        for item in todo if one_by_one else []:
            try:
                cursor = await b.execute(CREDIT, item_credit(item))
            except REFUSALS as exc:
                raise _Refused(item, refusal_reason(exc, item)) from exc
            if cursor.rowcount == 1:
                credited.add(item.transfer_id)
        return duplicates, [item for item in todo if item.transfer_id not in credited]


def _what(items: list[_Parsed]) -> str:
    """'transfer t-1' or '3 transfers (t-1, ...)', for errors."""
    if len(items) == 1:
        return f"transfer {items[0].transfer_id}"
    if not items:
        return "browse sentinels"
    return f"{len(items)} transfers ({items[0].transfer_id}, ...)"
