"""The consumer inside a global transaction, on asyncio (``twopc consumer --mode 2pc --asyncio``).

The same steps and the same promises as :mod:`scenarios.outbox.consumer_2pc`
(read it first): each credit command applied to B in an XA branch and its ACK
in the broker's transaction, committed by an :class:`~coordinator.aio.AsyncCoordinator`
whose broker (:class:`~participants.aio.activemq.AsyncActiveMQ`, one session)
delivered the message. It shares the sync consumer's coordinator id and
decision log, so either one recovers what the other left when it died.
"""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg

from coordinator import tracing
from coordinator.aio.coordinator import AsyncCoordinator
from coordinator.errors import ParticipantError, TwoPhaseCommitError
from coordinator.recovery import Decision
from coordinator.states import Outcome
from participants.aio.stomp import AsyncSubscription
from participants.stomp_client import Message
from scenarios import events as ev
from scenarios.outbox.consumer import (
    CONSUMER_CRASH_SETTING,
    REJECTED,
    ConsumerFailed,
    kind_problem,
    parse,
)
from scenarios.outbox.consumer_2pc import (
    ALREADY_CREDITED,
    Consumer2pcStats,
    TwoPhaseConsumer,
    _Transient,
    item_credit,
)
from scenarios.outbox.deadletter import Rejection, dead_letter_async, one_line
from scenarios.transfer.model import CREDIT, MissingAccount, require_applied
from scenarios.wiring import open_consuming_async_coordinator

#: How often the consumer looks at its stop event while it waits for a message.
POLL = 0.25


class AsyncTwoPhaseConsumer(TwoPhaseConsumer):
    """Applies credit commands to B inside global transactions of an AsyncCoordinator."""

    def run(self, stop: threading.Event | None = None) -> Consumer2pcStats:
        """Consume on an event loop of its own until ``stop`` is set (ConsumerFailed if it
        cannot)."""
        return asyncio.run(self.consume(stop or threading.Event()))

    async def consume(self, stop: threading.Event) -> Consumer2pcStats:
        """Consume until ``stop`` is set (looked at every 0.25 s)."""
        self.crashes.arm_from_env(CONSUMER_CRASH_SETTING)
        coordinator, broker = open_consuming_async_coordinator(self.settings)
        await coordinator.start()
        report = coordinator.last_recovery
        if report is not None:
            self.recovered = {
                "committed": sum(i.decision is Decision.COMMIT for i in report.items),
                "rolled_back": sum(i.decision is Decision.ROLLBACK for i in report.items),
            }
            self.log.info(ev.CONSUMER_2PC_RECOVERED, **self.recovered)
        self.log.info(ev.CONSUMER_STARTED, destination=self.destination, mode="2pc")
        failures = 0
        try:
            while not stop.is_set():
                try:
                    subscription = await broker.subscribe(self.destination, prefetch=1)
                    failures = 0
                    while not stop.is_set():
                        message = await subscription.get(POLL)
                        if message is not None:
                            await self.handle_async(coordinator, subscription, message)
                except (ParticipantError, psycopg.OperationalError, _Transient) as exc:
                    failures += 1
                    self.stats.reconnects += 1
                    self.log.warning(
                        ev.CONSUMER_CONNECTION_LOST, error=one_line(str(exc)), attempt=failures
                    )
                    deadline = time.monotonic() + self._delay(failures)
                    while not stop.is_set() and time.monotonic() < deadline:
                        await asyncio.sleep(min(POLL, deadline - time.monotonic()))
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

    async def handle_async(
        self, coordinator: AsyncCoordinator, subscription: AsyncSubscription, message: Message
    ) -> None:
        """Apply one message in one global transaction, or dead-letter it (as ``handle``)."""
        with tracing.continued(
            "twopc.consume",
            message.headers,
            **{"twopc.consumer": "consumer-2pc", "messaging.destination": self.destination},
        ):
            await self._handle_async(coordinator, subscription, message)

    async def _handle_async(
        self, coordinator: AsyncCoordinator, subscription: AsyncSubscription, message: Message
    ) -> None:
        started = time.perf_counter()
        if message.is_sentinel:  # left by a browse of the queue: consumed, nothing applied
            async with coordinator.transaction() as sentinel:
                await sentinel.ack(message.ack_id)
            return
        problem = kind_problem(message) or parse(message).problem
        if problem:
            await self._dead_letter_async(subscription, message, problem.removeprefix(REJECTED), 1)
            return
        self._deliveries[message.message_id] += 1
        attempts = self._deliveries[message.message_id]
        if attempts > self.max_attempts:
            reason = f"gave up after {attempts - 1} attempts (its transaction never committed)"
            await self._dead_letter_async(subscription, message, reason, attempts - 1)
            return
        self.crashes.hit("after-receipt")
        item = parse(message)
        tx = coordinator.begin()
        duplicate = False
        try:
            b = await tx.branch("b")
            found = await b.execute(ALREADY_CREDITED, (item.transfer_id,))
            duplicate = await found.fetchone() is not None
            if not duplicate:
                params = item_credit(item.transfer_id, item.target, item.amount)
                cursor = await b.execute(CREDIT, params)
                require_applied(cursor.rowcount, item.target, "b")
            await tx.ack(message.ack_id)
        except (MissingAccount, psycopg.IntegrityError, psycopg.DataError) as exc:
            await tx.rollback(f"transfer {item.transfer_id} refused by B: {exc}")
            reason = (
                f"{exc} (transfer {item.transfer_id})"
                if isinstance(exc, MissingAccount)
                else f"refused by B: {one_line(str(exc), 200)}"
            )
            await self._dead_letter_async(subscription, message, reason, attempts)
            return
        except (psycopg.OperationalError, psycopg.InterfaceError, ParticipantError) as exc:
            await tx.rollback(f"transfer {item.transfer_id}: {exc}")
            self._redeliver_async(subscription, tx.gtrid, item.transfer_id, str(exc))
        except TwoPhaseCommitError as exc:
            await tx.rollback(f"transfer {item.transfer_id}: {exc}")
            raise ConsumerFailed(
                f"the consumer stopped: transfer {item.transfer_id} (gtrid {tx.gtrid}): {exc}"
            ) from exc
        except psycopg.Error as exc:
            await tx.rollback(f"transfer {item.transfer_id}: {exc}")
            raise ConsumerFailed(
                f"the consumer stopped: applying transfer {item.transfer_id} to B in gtrid "
                f"{tx.gtrid} failed with {type(exc).__name__}: {one_line(str(exc), 300)}"
            ) from exc
        outcome = await tx.commit()
        if outcome is Outcome.COMMITTED:
            self._applied(message, item.transfer_id, tx.gtrid, duplicate, started)
        elif outcome is Outcome.IN_DOUBT:
            self._left_in_doubt(item.transfer_id, tx.gtrid, tx.reason)
        else:
            self._redeliver_async(subscription, tx.gtrid, item.transfer_id, tx.reason or "aborted")

    def _redeliver_async(
        self, subscription: AsyncSubscription, gtrid: str, transfer_id: str, reason: str
    ) -> None:
        """Drop the connection: the broker puts the unacknowledged message back."""
        self._count_abort(gtrid, transfer_id, reason)
        subscription.client.drop()
        raise _Transient(f"transfer {transfer_id} (gtrid {gtrid}) did not commit: {reason}")

    async def _dead_letter_async(
        self, subscription: AsyncSubscription, message: Message, reason: str, attempts: int
    ) -> None:
        rejection = Rejection(message, reason, attempts)
        await dead_letter_async(subscription.client, [rejection], destination=self.destination)
        self._dead_lettered(rejection, message, reason, attempts)
