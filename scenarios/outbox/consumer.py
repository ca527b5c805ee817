"""The consumer: takes credit commands off /queue/transfers.credit, credits B exactly once.

Each message is applied in one local transaction on B: an ``inbox`` row keyed
by the message's ``transfer-id`` header, the credit, and B's ``transfers``
row. A transfer id already in the inbox is a duplicate (a relay's retry or
replay, or a redelivery): it only counts ``duplicates`` and credits nothing.
The messages are acknowledged one by one (``client-individual``) after B's
commit, so a consumer that dies in between gets them redelivered, and the
inbox absorbs them.

Messages arriving together are applied in one B transaction (sorted by target
account, so that two consumers never deadlock) and then acknowledged.

A message the consumer cannot apply never stops it, nor the good messages of
its batch:

* it takes only commands: a message whose ``type`` header is missing or is not
  ``transfer.credit`` (an event such as ``transfer.completed`` says what
  happened, for whoever is interested: it asks this receiver for nothing), or
  that has no ``transfer-id``, is rejected unread. The event consumers of the
  fan-out (scenarios.outbox.fanout) check the other way round
  (:func:`event_problem`): a command that came through a topic is rejected;
* a malformed body, a credit to an account B does not have, or one that
  violates a constraint of B (a transfer id B already holds) is rejected, and
  the rest of the batch is applied again without it: nothing of it is
  written, not even an inbox row, so it can be requeued once fixed;
* a transient failure (the connection to B lost while applying, a
  serialization failure, a deadlock) is retried with backoff up to
  ``max_attempts`` times, then the batch is tried message by message, and
  what still fails is rejected. While B cannot be reached at all, the
  consumer waits without counting attempts.

Rejected messages go to the dead-letter queue ``/queue/DLQ.transfers.credit``
(scenarios.outbox.deadletter), counted and logged (``consumer.dead_lettered``).
What the consumer cannot work around at all (B without its tables, a bug)
stops it with :class:`ConsumerFailed`, one line that names the message.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from coordinator import tracing
from coordinator.errors import ConfigurationError, ParticipantError, TwoPhaseCommitError
from coordinator.events import get_logger
from participants.stomp_client import Message, StompClient, Subscription
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.crash_plan import CrashPlan
from scenarios.outbox.deadletter import Rejection, dead_letter, dead_letter_queue, one_line
from scenarios.transfer.model import (
    CREDIT,
    CREDIT_COMMAND,
    CREDIT_QUEUE,
    EVENT_TYPES,
    TYPE_HEADER,
    MissingAccount,
    require_applied,
)
from scenarios.transfer.schema import TABLES
from scenarios.wiring import open_stomp

#: Environment variable arming a consumer crash: ``after-b-commit=kill@3`` SIGKILLs the
#: consumer after its third B commit, before the acknowledgements; ``after-receipt``
#: (2pc mode) after a batch of messages arrived, before its transaction began.
CONSUMER_CRASH_SETTING = "TWOPC_CONSUMER_CRASH"
CONSUMER_CRASH_POINTS = ("after-b-commit", "after-receipt")

#: Attempts at a message that fails transiently before it is dead-lettered.
MAX_ATTEMPTS_SETTING = "TWOPC_CONSUMER_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 6

#: The outbox component's inbox row (outbox.tables.Tables.inbox_insert), keyed by transfer id.
INBOX_INSERT = TABLES.inbox_insert()

APPLIED = "applied"
DUPLICATE = "duplicate"
REJECTED = "rejected: "  # the prefix of every other outcome, followed by the reason

#: Failures worth another attempt: the connection lost, a serialization failure, a
#: deadlock, a lock or statement timeout (all OperationalError in psycopg).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError)


class ConsumerFailed(TwoPhaseCommitError):
    """The consumer met a failure it cannot work around (not one message's fault) and stopped."""


class _Stopped(Exception):
    """Shutdown was asked while waiting: leave the batch unacknowledged (redelivered)."""


class _Refused(Exception):
    """Message ``index`` of a batch cannot be applied; the batch's transaction rolls back."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


@dataclass
class ConsumerStats:
    """What a consumer did since it started."""

    applied: int = 0
    duplicates: int = 0
    rejected: int = 0  # messages it could not apply
    dead_lettered: int = 0  # of those, moved to the dead-letter queue
    retries: int = 0  # transient failures retried
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


def kind_problem(message: Message) -> str:
    """Why the consumer does not take ``message`` as a credit command; empty if it does."""
    kind = message.headers.get(TYPE_HEADER)
    if kind is None:
        return f"{REJECTED}no {TYPE_HEADER} header (the consumer takes {CREDIT_COMMAND})"
    if kind in EVENT_TYPES:
        return (
            f"{REJECTED}{TYPE_HEADER} {kind} is an event (it says what happened, for whoever "
            f"is interested), not a {CREDIT_COMMAND} command: events go to a topic"
        )
    if kind != CREDIT_COMMAND:
        return f"{REJECTED}unknown {TYPE_HEADER} {one_line(kind, 80)!r} (expected {CREDIT_COMMAND})"
    if not message.headers.get("transfer-id"):
        return f"{REJECTED}no transfer-id header"
    return ""


def event_problem(message: Message, takes: frozenset[str] = EVENT_TYPES) -> str:
    """Why an event consumer (on a queue of a virtual topic) does not take ``message``; empty
    if it does: an event of a type in ``takes`` with a ``transfer-id``."""
    kind = message.headers.get(TYPE_HEADER)
    expected = " or ".join(sorted(takes))
    if kind is None:
        return f"{REJECTED}no {TYPE_HEADER} header (this consumer takes {expected} events)"
    if kind == CREDIT_COMMAND:
        return (
            f"{REJECTED}{TYPE_HEADER} {kind} is a command (it has one receiver, on its own "
            f"queue), published to a topic: commands are never broadcast"
        )
    if kind not in takes:
        return f"{REJECTED}unknown {TYPE_HEADER} {one_line(kind, 80)!r} (expected {expected})"
    if not message.headers.get("transfer-id"):
        return f"{REJECTED}no transfer-id header"
    return ""


def parse(message: Message) -> _Parsed:
    """The transfer a message carries; ``problem`` says what is wrong with a bad one."""
    transfer_id = message.headers.get("transfer-id") or message.message_id
    try:
        body = json.loads(message.body)
        target, amount = body["to"], body["amount"]
        if str(body["transfer_id"]) != transfer_id:
            return _Parsed(message, transfer_id, "", 0, f"{REJECTED}header and body ids differ")
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return _Parsed(message, transfer_id, "", 0, f"{REJECTED}malformed body")
    if not isinstance(target, str) or not target:
        return _Parsed(message, transfer_id, "", 0, f"{REJECTED}malformed body: bad 'to'")
    if not isinstance(amount, int) or isinstance(amount, bool):
        return _Parsed(message, transfer_id, target, 0, f"{REJECTED}amount must be an integer")
    if amount <= 0:
        return _Parsed(message, transfer_id, target, amount, f"{REJECTED}amount must be > 0")
    return _Parsed(message, transfer_id, target, amount, "")


def check_retries(max_attempts: int, retry_delay: float, max_delay: float) -> None:
    """Refuse retry settings a consumer (inbox or 2pc) cannot work with."""
    if max_attempts < 1 or retry_delay <= 0 or max_delay < retry_delay:
        raise ConfigurationError(
            f"consumer retries: max attempts must be >= 1 (not {max_attempts}) and "
            f"0 < retry delay <= max delay (not {retry_delay}, {max_delay})"
        )


class Consumer:
    """Applies transfers to B from the queue until stopped; reconnects after failures.

    ``problem_of`` (which messages it takes) and ``apply_batch`` (what a batch
    does to B, one outcome per message) are what a consumer of another kind
    replaces (scenarios.outbox.fanout: the audit log).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        destination: str = CREDIT_QUEUE,
        prefetch: int = 500,
        batch_size: int = 200,
        name: str = "consumer",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delay: float = 0.2,
        max_delay: float = 5.0,
    ) -> None:
        check_retries(max_attempts, retry_delay, max_delay)
        self.settings = settings
        self.destination = destination
        self.dead_letter_queue = dead_letter_queue(destination)
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.max_delay = max_delay
        self.name = name
        self.stats = ConsumerStats()
        self.crashes = CrashPlan("consumer", CONSUMER_CRASH_POINTS)
        self.log = get_logger(component="consumer", consumer=name)
        self._stop = threading.Event()
        self._db: psycopg.Connection | None = None
        self._client: StompClient | None = None

    def run(self, stop: threading.Event | None = None) -> ConsumerStats:
        """Consume until ``stop`` is set (checked every 0.25 s); ConsumerFailed if it cannot."""
        self._stop = stop = stop or threading.Event()
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
                except _Stopped:
                    break
                except (ParticipantError, psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    failures += 1
                    self.stats.reconnects += 1
                    self.log.warning(
                        ev.CONSUMER_CONNECTION_LOST, error=one_line(str(exc)), attempt=failures
                    )
                    self._disconnect()  # unacknowledged messages go back to the queue
                    stop.wait(self._delay(failures))
        except ConsumerFailed as exc:
            self.log.error(ev.CONSUMER_FAILED, error=str(exc))
            raise
        except Exception as exc:
            failed = ConsumerFailed(f"the consumer stopped: {type(exc).__name__}: {exc}")
            self.log.error(ev.CONSUMER_FAILED, error=one_line(str(failed)))
            raise failed from exc
        finally:
            self._disconnect(graceful=True)
            self.log.info(ev.CONSUMER_STOPPED, **self.stats.as_dict())
        return self.stats

    def problem_of(self, message: Message) -> str:
        """Why this consumer does not take ``message``; empty if it does (credit commands)."""
        return kind_problem(message)

    def apply_batch(self, db: psycopg.Connection, messages: Sequence[Message]) -> list[str]:
        """Apply ``messages`` in one B transaction; each one's outcome (see :func:`apply`)."""
        return apply(db, messages)

    def _delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.retry_delay * 2 ** (min(attempt, 10) - 1)))

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

    def _database(self) -> psycopg.Connection:
        """The connection to B; while B cannot be reached, wait (no attempt is counted)."""
        waited = 0
        while self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                self._db.close()
                self._db = None
            try:
                self._db = psycopg.connect(self.settings.pg_b)
            except psycopg.OperationalError as exc:
                waited += 1
                self.log.warning(
                    ev.CONSUMER_DATABASE_UNREACHABLE, error=one_line(str(exc)), attempt=waited
                )
                if self._stop.wait(self._delay(waited)):
                    raise _Stopped() from None
        return self._db

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
        """Apply the batch's credit commands in one B transaction, acknowledge them, and
        move what cannot be applied to the dead-letter queue.

        With tracing, each message's span continues the trace its sender started.
        """
        spans = tracing.continue_each(
            "twopc.consume",
            (m.headers for m in batch if not m.is_sentinel),
            **{"twopc.consumer": self.name, "messaging.destination": self.destination},
        )
        try:
            self._handle(batch)
        finally:
            tracing.end_all(spans)

    def _handle(self, batch: Sequence[Message]) -> None:
        if self._client is None:
            raise RuntimeError("the consumer is not connected")
        client = self._client
        done: list[Message] = []  # applied, duplicates and browse sentinels: acknowledged
        commands: list[Message] = []
        rejections: list[Rejection] = []
        for message in batch:
            if message.is_sentinel:
                done.append(message)  # left by a browse of the queue: dropped
                continue
            problem = self.problem_of(message)
            if problem:
                rejections.append(Rejection(message, problem.removeprefix(REJECTED)))
            else:
                commands.append(message)
        for message, (outcome, attempts) in zip(
            commands, self._apply_retrying(commands), strict=True
        ):
            if outcome == APPLIED:
                self.stats.applied += 1
                done.append(message)
            elif outcome == DUPLICATE:
                self.stats.duplicates += 1
                done.append(message)
            else:
                rejections.append(Rejection(message, outcome.removeprefix(REJECTED), attempts))
        self.stats.batches += 1
        if self.crashes.hit("after-b-commit"):
            # As if the process died here: no ACK, so the broker redelivers the batch.
            raise ParticipantError("crash injected after B's commit", participant="consumer")
        for message in done:
            client.ack(message)
        if rejections:
            self.stats.rejected += len(rejections)
            dead_letter(client, rejections, destination=self.destination)
            self.stats.dead_lettered += len(rejections)
            for rejection in rejections:
                self.log.error(
                    ev.CONSUMER_DEAD_LETTERED,
                    transfer_id=rejection.transfer_id,
                    message_id=rejection.message.message_id,
                    reason=rejection.reason,
                    attempts=rejection.attempts,
                    dead_letter_queue=self.dead_letter_queue,
                )
        self.log.debug(ev.CONSUMER_BATCH, messages=len(batch), dead_lettered=len(rejections))

    def _apply_retrying(self, messages: Sequence[Message]) -> list[tuple[str, int]]:
        """Each message's outcome and the attempts it took; transient failures are retried."""
        if not messages:
            return []
        attempt = 0
        while True:
            attempt += 1
            db = self._database()
            try:
                return [(outcome, attempt) for outcome in self.apply_batch(db, messages)]
            except TRANSIENT_ERRORS as exc:
                error = one_line(f"{type(exc).__name__}: {exc}", 300)
                self.stats.retries += 1
                if db.closed or db.broken:
                    db.close()
                    self._db = None
            except psycopg.Error as exc:
                # Not one message's fault (a missing table, a missing privilege): every
                # message would fail the same way, so stop rather than dead-letter them all.
                hint = (
                    "; run 'twopc transfer --reset' to create the tables"
                    if isinstance(exc, psycopg.errors.UndefinedTable)
                    else ""
                )
                raise ConsumerFailed(
                    f"the consumer stopped: applying {_ids(messages)} to B failed with "
                    f"{type(exc).__name__}: {one_line(str(exc), 300)}{hint}"
                ) from exc
            if attempt >= self.max_attempts:
                if len(messages) > 1:  # find the one that fails: each alone, with its own tries
                    return [result for m in messages for result in self._apply_retrying([m])]
                return [(f"{REJECTED}gave up after {attempt} attempts: {error}", attempt)]
            self.log.warning(
                ev.CONSUMER_RETRYING,
                attempt=attempt,
                max_attempts=self.max_attempts,
                transfer_ids=_ids(messages),
                error=error,
            )
            if self._stop.wait(self._delay(attempt)):
                raise _Stopped()


def _ids(messages: Sequence[Message], most: int = 3) -> str:
    """'transfer t-1' or 'transfers t-1, t-2, t-3 and 7 more', for errors and logs."""
    ids = [m.headers.get("transfer-id") or m.message_id for m in messages]
    if len(ids) == 1:
        return f"transfer {ids[0]}"
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return f"transfers {', '.join(ids[:most])}{more}"


def apply(db: psycopg.Connection, batch: Sequence[Message]) -> list[str]:
    """Apply ``batch`` to B in one transaction; each message's outcome, in batch order.

    Outcomes: ``applied``, ``duplicate`` (its transfer id was in the inbox), or
    ``rejected: <reason>``: a malformed body, an account B does not have, a
    constraint of B it violates. A rejected message writes nothing (no inbox
    row either): the transaction is rolled back and the others applied again
    without it. Transient failures (psycopg.OperationalError) and failures that
    are no message's fault (a missing table) are raised.
    """
    parsed = [parse(m) for m in batch]
    outcomes = {i: item.problem for i, item in enumerate(parsed) if item.problem}
    while True:
        todo = [i for i in range(len(parsed)) if i not in outcomes]
        try:
            outcomes.update(_apply_once(db, parsed, todo))
        except _Refused as refused:
            outcomes[refused.index] = REJECTED + refused.reason
            continue
        return [outcomes[i] for i in range(len(parsed))]


def _apply_once(
    db: psycopg.Connection, parsed: Sequence[_Parsed], todo: list[int]
) -> dict[int, str]:
    """One B transaction over ``todo``; _Refused (rolled back) at the first message B refuses."""
    outcomes: dict[int, str] = {}
    if not todo:
        return outcomes
    seen: set[str] = set()
    order = sorted(todo, key=lambda i: (parsed[i].target, parsed[i].transfer_id))
    with db.transaction(), db.cursor() as cur:
        for i in order:
            item = parsed[i]
            try:
                cur.execute(INBOX_INSERT, (item.transfer_id, item.message.message_id, APPLIED))
                row = cur.fetchone()
                if item.transfer_id in seen or not (row and row[0]):
                    outcomes[i] = DUPLICATE  # in the inbox already, or twice in this batch
                    continue
                seen.add(item.transfer_id)
                cur.execute(
                    CREDIT,
                    {"amount": item.amount, "account": item.target, "tid": item.transfer_id},
                )
                require_applied(cur.rowcount, item.target, "b")
            except MissingAccount as exc:  # the UPDATE touched no row
                raise _Refused(i, f"{exc} (transfer {item.transfer_id})") from exc
            except psycopg.IntegrityError as exc:
                constraint = exc.diag.constraint_name or type(exc).__name__
                raise _Refused(i, f"violates {constraint} in B: {one_line(str(exc), 200)}") from exc
            except psycopg.DataError as exc:
                raise _Refused(i, f"invalid for B: {one_line(str(exc), 200)}") from exc
            outcomes[i] = APPLIED
    return outcomes


def inbox_counts(dsn: str) -> dict[str, Any]:
    """Rows, duplicates absorbed and rejections in B's inbox (for reports and tests)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(duplicates), 0), "
            "count(*) FILTER (WHERE outcome <> 'applied') FROM inbox"
        ).fetchone()
    rows, duplicates, rejected = row if row else (0, 0, 0)
    return {"rows": int(rows), "duplicates": int(duplicates), "rejected": int(rejected)}
