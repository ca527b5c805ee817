"""The consumer inside a global transaction (``twopc consumer --mode 2pc``): no inbox table.

Each credit command is taken off the queue and applied in one global
transaction of a coordinator of its own (scenarios.wiring.open_consuming_coordinator):

1. the message arrives on a ``client-individual`` subscription of the
   coordinator's one broker session;
2. the credit runs on B in an XA branch (with a check that B does not hold
   the transfer already: a relay's duplicate is acknowledged and credits
   nothing);
3. the message's ACK goes out inside the broker transaction
   (``Transaction.ack``);
4. the coordinator commits: PREPARE on B, then the broker's COMMIT carrying
   the ACK and the commit marker (the commit point), then COMMIT PREPARED.

A crash before the broker's COMMIT leaves the message on the queue (the
broker drops an uncommitted ACK with its connection) and B's branch, if
prepared, without a marker: recovery rolls it back. A crash after it leaves
the message consumed and the marker on the marker queue: recovery commits B.
The consumer runs its coordinator's recovery when it starts.

Poison messages (another ``type``, a malformed body, a missing account, a
constraint of B) go to the dead-letter queue, as in the inbox consumer. A
transaction that aborts for another reason (B unreachable, a refused
COMMIT) drops the connection, so that the message comes back; after
``max_attempts`` deliveries it is dead-lettered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg

from coordinator import tracing
from coordinator.coordinator import Coordinator
from coordinator.errors import ParticipantError, TwoPhaseCommitError
from coordinator.events import get_logger
from coordinator.recovery import Decision
from coordinator.states import Outcome
from participants.stomp_client import Message, Subscription
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.crash_plan import CrashPlan
from scenarios.outbox.consumer import (
    CONSUMER_CRASH_POINTS,
    CONSUMER_CRASH_SETTING,
    DEFAULT_MAX_ATTEMPTS,
    REJECTED,
    ConsumerFailed,
    ConsumerStats,
    check_retries,
    kind_problem,
    parse,
)
from scenarios.outbox.deadletter import Rejection, dead_letter, dead_letter_queue, one_line
from scenarios.transfer.model import CREDIT, CREDIT_QUEUE, MissingAccount, require_applied
from scenarios.wiring import open_consuming_coordinator

#: B already holds the transfer: the command is a duplicate (a relay's retry or replay).
ALREADY_CREDITED = "SELECT 1 FROM transfers WHERE transfer_id = %s"


@dataclass
class Consumer2pcStats(ConsumerStats):
    """What a consumer in 2pc mode did: the inbox consumer's counts and the outcomes."""

    aborted: int = 0  # transactions rolled back (the message went back to the queue)
    in_doubt: int = 0  # left to the coordinator's recovery
    latencies: list[float] = field(default_factory=list, repr=False)  # s per applied message

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


class _Transient(Exception):
    """The transaction did not commit for a reason that is not the message's: redeliver."""


class TwoPhaseConsumer:
    """Applies credit commands to B inside global transactions until stopped."""

    def __init__(
        self,
        settings: Settings,
        *,
        destination: str = CREDIT_QUEUE,
        name: str = "consumer-2pc",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delay: float = 0.2,
        max_delay: float = 5.0,
    ) -> None:
        check_retries(max_attempts, retry_delay, max_delay)
        self.settings = settings
        self.destination = destination
        self.dead_letter_queue = dead_letter_queue(destination)
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.max_delay = max_delay
        self.stats = Consumer2pcStats()
        self.crashes = CrashPlan("consumer", CONSUMER_CRASH_POINTS)
        self.log = get_logger(component="consumer", consumer=name, mode="2pc")
        self.recovered: dict[str, int] = {}
        self._deliveries: Counter[str] = Counter()  # message id -> deliveries seen

    def run(self, stop: threading.Event | None = None) -> Consumer2pcStats:
        """Consume until ``stop`` is set (checked every 0.25 s); ConsumerFailed if it cannot."""
        stop = stop or threading.Event()
        self.crashes.arm_from_env(CONSUMER_CRASH_SETTING)
        coordinator, broker = open_consuming_coordinator(self.settings)
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
                    subscription = broker.subscribe(self.destination, prefetch=1)
                    failures = 0
                    while not stop.is_set():
                        message = subscription.get(0.25)
                        if message is not None:
                            self.handle(coordinator, subscription, message)
                except (ParticipantError, psycopg.OperationalError, _Transient) as exc:
                    failures += 1
                    self.stats.reconnects += 1
                    self.log.warning(
                        ev.CONSUMER_CONNECTION_LOST, error=one_line(str(exc)), attempt=failures
                    )
                    stop.wait(self._delay(failures))
        except ConsumerFailed as exc:
            self.log.error(ev.CONSUMER_FAILED, error=str(exc))
            raise
        except Exception as exc:
            failed = ConsumerFailed(f"the consumer stopped: {type(exc).__name__}: {exc}")
            self.log.error(ev.CONSUMER_FAILED, error=one_line(str(failed)))
            raise failed from exc
        finally:
            coordinator.close()
            self.log.info(ev.CONSUMER_STOPPED, **self.stats.as_dict())
        return self.stats

    def _delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.retry_delay * 2 ** (min(attempt, 10) - 1)))

    def handle(
        self, coordinator: Coordinator, subscription: Subscription, message: Message
    ) -> None:
        """Apply one message in one global transaction, or dead-letter it.

        With tracing, the message's span continues its sender's trace and the
        global transaction that applies it is a child of that span.
        """
        with tracing.continued(
            "twopc.consume",
            message.headers,
            **{"twopc.consumer": "consumer-2pc", "messaging.destination": self.destination},
        ):
            self._handle(coordinator, subscription, message)

    def _handle(
        self, coordinator: Coordinator, subscription: Subscription, message: Message
    ) -> None:
        started = time.perf_counter()
        if message.is_sentinel:  # left by a browse of the queue: consumed, nothing applied
            with coordinator.transaction() as tx:
                tx.ack(message.ack_id)
            return
        problem = kind_problem(message) or parse(message).problem
        if problem:
            self._dead_letter(subscription, message, problem.removeprefix(REJECTED), 1)
            return
        self._deliveries[message.message_id] += 1
        attempts = self._deliveries[message.message_id]
        if attempts > self.max_attempts:
            reason = f"gave up after {attempts - 1} attempts (its transaction never committed)"
            self._dead_letter(subscription, message, reason, attempts - 1)
            return
        self.crashes.hit("after-receipt")
        item = parse(message)
        tx = coordinator.begin()
        duplicate = False
        try:
            b = tx.branch("b")
            duplicate = b.execute(ALREADY_CREDITED, (item.transfer_id,)).fetchone() is not None
            if not duplicate:
                cursor = b.execute(CREDIT, item_credit(item.transfer_id, item.target, item.amount))
                require_applied(cursor.rowcount, item.target, "b")
            tx.ack(message.ack_id)
        except (MissingAccount, psycopg.IntegrityError, psycopg.DataError) as exc:
            tx.rollback(f"transfer {item.transfer_id} refused by B: {exc}")
            reason = (
                f"{exc} (transfer {item.transfer_id})"
                if isinstance(exc, MissingAccount)
                else f"refused by B: {one_line(str(exc), 200)}"
            )
            self._dead_letter(subscription, message, reason, attempts)
            return
        except (psycopg.OperationalError, psycopg.InterfaceError, ParticipantError) as exc:
            tx.rollback(f"transfer {item.transfer_id}: {exc}")
            self._redeliver(subscription, tx.gtrid, item.transfer_id, str(exc))
        except TwoPhaseCommitError as exc:
            tx.rollback(f"transfer {item.transfer_id}: {exc}")
            raise ConsumerFailed(
                f"the consumer stopped: transfer {item.transfer_id} (gtrid {tx.gtrid}): {exc}"
            ) from exc
        except psycopg.Error as exc:
            tx.rollback(f"transfer {item.transfer_id}: {exc}")
            raise ConsumerFailed(
                f"the consumer stopped: applying transfer {item.transfer_id} to B in gtrid "
                f"{tx.gtrid} failed with {type(exc).__name__}: {one_line(str(exc), 300)}"
            ) from exc
        outcome = tx.commit()
        if outcome is Outcome.COMMITTED:
            self._applied(message, item.transfer_id, tx.gtrid, duplicate, started)
        elif outcome is Outcome.IN_DOUBT:
            self._left_in_doubt(item.transfer_id, tx.gtrid, tx.reason)
        else:
            self._redeliver(subscription, tx.gtrid, item.transfer_id, tx.reason or "aborted")

    def _applied(
        self, message: Message, transfer_id: str, gtrid: str, duplicate: bool, started: float
    ) -> None:
        """The transaction committed: the message is consumed, B holds the transfer."""
        self._deliveries.pop(message.message_id, None)
        if duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.applied += 1
            self.stats.latencies.append(time.perf_counter() - started)
        self.stats.batches += 1
        self.log.debug(
            ev.CONSUMER_2PC_APPLIED, transfer_id=transfer_id, gtrid=gtrid, duplicate=duplicate
        )

    def _left_in_doubt(self, transfer_id: str, gtrid: str, reason: str | None) -> None:
        """The coordinator resolves it (marker or not); the session was dropped, so the
        message is either consumed with B committed, or back on the queue."""
        self.stats.in_doubt += 1
        self.log.warning(
            ev.CONSUMER_2PC_IN_DOUBT, transfer_id=transfer_id, gtrid=gtrid, reason=reason
        )

    def _count_abort(self, gtrid: str, transfer_id: str, reason: str) -> None:
        self.stats.aborted += 1
        self.stats.retries += 1
        self.log.warning(
            ev.CONSUMER_2PC_ABORTED, transfer_id=transfer_id, gtrid=gtrid, reason=one_line(reason)
        )

    def _redeliver(
        self, subscription: Subscription, gtrid: str, transfer_id: str, reason: str
    ) -> None:
        """Drop the connection: the broker puts the unacknowledged message back."""
        self._count_abort(gtrid, transfer_id, reason)
        subscription.client.drop()
        raise _Transient(f"transfer {transfer_id} (gtrid {gtrid}) did not commit: {reason}")

    def _dead_letter(
        self, subscription: Subscription, message: Message, reason: str, attempts: int
    ) -> None:
        rejection = Rejection(message, reason, attempts)
        dead_letter(subscription.client, [rejection], destination=self.destination)
        self._dead_lettered(rejection, message, reason, attempts)

    def _dead_lettered(
        self, rejection: Rejection, message: Message, reason: str, attempts: int
    ) -> None:
        self._deliveries.pop(message.message_id, None)
        self.stats.rejected += 1
        self.stats.dead_lettered += 1
        self.log.error(
            ev.CONSUMER_DEAD_LETTERED,
            transfer_id=rejection.transfer_id,
            message_id=message.message_id,
            reason=reason,
            attempts=attempts,
            dead_letter_queue=self.dead_letter_queue,
        )


def item_credit(transfer_id: str, target: str, amount: int) -> dict[str, object]:
    """The parameters of CREDIT."""
    return {"amount": amount, "account": target, "tid": transfer_id}
