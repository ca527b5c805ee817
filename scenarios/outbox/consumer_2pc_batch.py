"""What the 2PC consumer's two APIs share: its settings, its counts, how it sorts a batch.

The consumer itself (:mod:`scenarios.outbox.consumer_2pc_aio`, from which
``scripts/unasync.py`` generates :mod:`scenarios.outbox.consumer_2pc`) takes up
to ``batch_size`` messages, waiting at most ``max_wait`` seconds for more after
the first, and applies them in one global transaction (docs/design.md §8).
Everything here does no I/O: which messages of a batch are credit commands,
which are rejected unread, which go in a transaction of their own, and what is
counted and logged once a transaction ended.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg

from coordinator.errors import ConfigurationError
from coordinator.events import get_logger
from coordinator.recovery import Decision, RecoveryReport
from participants.stomp_client import Message
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.crash_plan import CrashPlan
from scenarios.outbox.consumer import (
    CONSUMER_CRASH_POINTS,
    DEFAULT_MAX_ATTEMPTS,
    REJECTED,
    ConsumerStats,
    _Parsed,
    check_retries,
    kind_problem,
    parse,
)
from scenarios.outbox.deadletter import Rejection, dead_letter_queue, one_line
from scenarios.transfer.model import CREDIT_QUEUE, MissingAccount

#: The transfers of a batch B holds already: duplicates (a relay's retry or replay),
#: acknowledged and credited nothing. One statement for the whole batch.
ALREADY_CREDITED = "SELECT transfer_id FROM transfers WHERE transfer_id = ANY(%s)"

#: The credits of a batch in one statement (B's part of the inbox consumer's work, without
#: the inbox): the accounts locked in id order before any is updated (the sums read every
#: locked row first), so that two consumers do not deadlock; each account credited its
#: batch's sum, a ``transfers`` row per credit. It returns the transfer ids credited: a
#: credit to an account B does not have writes nothing and is not returned.
CREDIT_BATCH = """
WITH items AS (
    SELECT * FROM unnest(%(tids)s::text[], %(accounts)s::text[], %(amounts)s::bigint[])
        AS item (tid, account, amount)
), locked AS MATERIALIZED (
    SELECT id FROM accounts WHERE id IN (SELECT account FROM items) ORDER BY id FOR UPDATE
), credited AS (
    UPDATE accounts SET balance = balance + total.amount
    FROM (
        SELECT account, sum(amount) AS amount FROM items
        WHERE account IN (SELECT id FROM locked) GROUP BY account
    ) AS total
    WHERE accounts.id = total.account
    RETURNING accounts.id
)
INSERT INTO transfers (transfer_id, amount)
SELECT items.tid, items.amount FROM items JOIN credited ON credited.id = items.account
RETURNING transfer_id
"""

#: Messages per global transaction, chosen from the curve of docs/benchmarks.md
#: (``twopc bench consumers``): the throughput peaks near 200 and falls at 500.
DEFAULT_BATCH_SIZE = 200
#: How long a batch waits for more messages after its first (seconds): a lone message
#: waits this long before its transaction begins.
DEFAULT_MAX_WAIT = 0.002
#: Messages the broker may deliver ahead of the batch being applied, at least.
MIN_PREFETCH = 500

#: The failures of a credit that are the message's own (B refuses it): it is dead-lettered
#: and the rest of its batch applied again without it.
REFUSALS: tuple[type[Exception], ...] = (MissingAccount, psycopg.IntegrityError, psycopg.DataError)


@dataclass
class Consumer2pcStats(ConsumerStats):
    """What a consumer in 2pc mode did: the inbox consumer's counts and the outcomes."""

    aborted: int = 0  # transactions rolled back (their messages went back to the queue)
    in_doubt: int = 0  # left to the coordinator's recovery
    latencies: list[float] = field(default_factory=list, repr=False)  # s per applied message

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


class Redeliver(Exception):
    """A transaction did not commit for a reason that is not its messages': the
    connection is dropped and the broker delivers them again."""


@dataclass
class Batch:
    """Messages taken together: the credit commands to apply in one transaction, and
    what the consumer acknowledges or dead-letters without applying."""

    taken_at: float
    commands: list[_Parsed] = field(default_factory=list)
    sentinels: list[Message] = field(default_factory=list)  # left by browses: ACKed only
    rejections: list[Rejection] = field(default_factory=list)
    alone: list[_Parsed] = field(default_factory=list)  # failed before: one transaction each


def check_batching(batch_size: int, max_wait: float) -> None:
    """Refuse a batch size or wait the consumer cannot work with."""
    if batch_size < 1 or max_wait < 0:
        raise ConfigurationError(
            f"2pc consumer batches: the batch size must be >= 1 (not {batch_size}) and the "
            f"wait for more messages >= 0 s (not {max_wait})"
        )


def refusal_reason(exc: Exception, item: _Parsed) -> str:
    """Why B refused a credit, on one line (the dead letter's reason)."""
    if isinstance(exc, MissingAccount):
        return f"{exc} (transfer {item.transfer_id})"
    return f"refused by B: {one_line(str(exc), 200)}"


def credit_order(items: list[_Parsed]) -> list[_Parsed]:
    """The order a batch's credits run in: by target account, so that two consumers
    lock B's rows in the same order and never deadlock."""
    return sorted(items, key=lambda item: (item.target, item.transfer_id))


def item_credit(item: _Parsed) -> dict[str, object]:
    """The parameters of CREDIT for one command."""
    return {"amount": item.amount, "account": item.target, "tid": item.transfer_id}


def credit_batch(items: list[_Parsed]) -> dict[str, object]:
    """The parameters of CREDIT_BATCH for commands of distinct transfer ids."""
    return {
        "tids": [item.transfer_id for item in items],
        "accounts": [item.target for item in items],
        "amounts": [item.amount for item in items],
    }


class TwoPhaseConsumerBase:
    """The 2PC consumer's state and its steps that do no I/O (both APIs)."""

    def __init__(
        self,
        settings: Settings,
        *,
        destination: str = CREDIT_QUEUE,
        name: str = "consumer-2pc",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delay: float = 0.2,
        max_delay: float = 5.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_wait: float = DEFAULT_MAX_WAIT,
        prefetch: int | None = None,
    ) -> None:
        check_retries(max_attempts, retry_delay, max_delay)
        check_batching(batch_size, max_wait)
        self.settings = settings
        self.destination = destination
        self.dead_letter_queue = dead_letter_queue(destination)
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.max_delay = max_delay
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.prefetch = max(prefetch or MIN_PREFETCH, 2 * batch_size)
        self.stats = Consumer2pcStats()
        self.crashes = CrashPlan("consumer", CONSUMER_CRASH_POINTS)
        self.log = get_logger(component="consumer", consumer=name, mode="2pc")
        self.recovered: dict[str, int] = {}
        self._deliveries: Counter[str] = Counter()  # message id -> transactions tried

    def _delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.retry_delay * 2 ** (min(attempt, 10) - 1)))

    def _sort(self, messages: list[Message]) -> Batch:
        """Sort what was taken: sentinels, messages rejected unread (not a credit command,
        a malformed body, too many attempts), commands for the batch's transaction, and
        commands that failed before, each for a transaction of its own (so that one that
        keeps failing is dead-lettered alone, the others committed)."""
        batch = Batch(time.perf_counter())
        for message in messages:
            if message.is_sentinel:
                batch.sentinels.append(message)
                continue
            problem = kind_problem(message) or parse(message).problem
            if problem:
                batch.rejections.append(Rejection(message, problem.removeprefix(REJECTED)))
                continue
            tried = self._deliveries[message.message_id]
            if tried >= self.max_attempts:
                reason = f"gave up after {tried} attempts (its transaction never committed)"
                batch.rejections.append(Rejection(message, reason, tried))
            elif tried:
                batch.alone.append(parse(message))
            else:
                batch.commands.append(parse(message))
        return batch

    def _rejection(self, item: _Parsed, reason: str) -> Rejection:
        """A command B refused, to dead-letter, with the attempts it took."""
        return Rejection(item.message, reason, self._deliveries[item.message.message_id])

    def _attempting(self, items: list[_Parsed]) -> None:
        """A transaction begins for ``items``: one more attempt for each."""
        for item in items:
            self._deliveries[item.message.message_id] += 1

    def _report_recovery(self, report: RecoveryReport | None) -> None:
        """What the coordinator's recovery at start did, logged."""
        if report is None:
            return
        self.recovered = {
            "committed": sum(i.decision is Decision.COMMIT for i in report.items),
            "rolled_back": sum(i.decision is Decision.ROLLBACK for i in report.items),
        }
        self.log.info(ev.CONSUMER_2PC_RECOVERED, **self.recovered)

    def _applied(
        self, items: list[_Parsed], duplicates: set[str], gtrid: str, started: float
    ) -> None:
        """The transaction committed: its messages are consumed, B holds their transfers
        (``duplicates``: the message ids that credited nothing)."""
        now = time.perf_counter()
        for item in items:
            self._deliveries.pop(item.message.message_id, None)
            if item.message.message_id in duplicates:
                self.stats.duplicates += 1
            else:
                self.stats.applied += 1
                self.stats.latencies.append(now - started)
        self.stats.batches += 1
        self.log.debug(
            ev.CONSUMER_2PC_APPLIED,
            transfer_id=items[0].transfer_id if items else "",
            messages=len(items),
            duplicates=len(duplicates),
            gtrid=gtrid,
        )

    def _left_in_doubt(self, items: list[_Parsed], gtrid: str, reason: str | None) -> None:
        """The coordinator resolves it (marker or not); the session was dropped, so the
        messages are either consumed with B committed, or back on the queue."""
        self.stats.in_doubt += 1
        self.log.warning(
            ev.CONSUMER_2PC_IN_DOUBT,
            transfer_id=items[0].transfer_id if items else "",
            messages=len(items),
            gtrid=gtrid,
            reason=reason,
        )

    def _aborted(self, items: list[_Parsed], gtrid: str, reason: str) -> Redeliver:
        """Count a transaction that did not commit; the error that drops the connection."""
        self.stats.aborted += 1
        self.stats.retries += 1
        first = items[0].transfer_id if items else ""
        self.log.warning(
            ev.CONSUMER_2PC_ABORTED,
            transfer_id=first,
            messages=len(items),
            gtrid=gtrid,
            reason=one_line(reason),
        )
        what = f"transfer {first}" if len(items) == 1 else f"{len(items)} transfers ({first}...)"
        return Redeliver(f"{what} (gtrid {gtrid}) did not commit: {reason}")

    def _dead_lettered(self, rejections: list[Rejection]) -> None:
        for rejection in rejections:
            message = rejection.message
            self._deliveries.pop(message.message_id, None)
            self.stats.rejected += 1
            self.stats.dead_lettered += 1
            self.log.error(
                ev.CONSUMER_DEAD_LETTERED,
                transfer_id=rejection.transfer_id,
                message_id=message.message_id,
                reason=rejection.reason,
                attempts=rejection.attempts,
                dead_letter_queue=self.dead_letter_queue,
            )
