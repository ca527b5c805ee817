"""An inbox consumer to run in the application's service: each message applied once.

It subscribes to a queue (``client-individual`` acknowledgements) and, for
each message, runs the application's handler through :func:`outbox.inbox.receive`:
the message's key (the ``Tables.key_header`` header) inserted into the inbox
and the handler's writes committed in one transaction on the consuming
database, then the message acknowledged. A consumer that dies between the
commit and the ACK gets the message again, and the inbox absorbs it.

A message it cannot apply never stops it:

* no key header, a handler that raises :class:`Reject`, or one whose write
  the database refuses as the message's fault (an integrity or data error):
  dead-lettered at once;
* a transient failure (the connection lost, a serialization failure, a
  deadlock: psycopg.OperationalError) is retried with backoff up to
  ``max_attempts`` times, then dead-lettered.

Dead letters go to ``/queue/DLQ.<name>`` (:mod:`outbox.deadletter`). Anything
else the handler raises stops the consumer as :class:`ConsumerFailed`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from coordinator.errors import ParticipantError, TwoPhaseCommitError
from coordinator.events import get_logger
from outbox import events as ev
from outbox.deadletter import dead_letter
from outbox.inbox import APPLIED, receive
from outbox.rejection import Rejection, dead_letter_queue, one_line
from outbox.tables import Tables
from participants.stomp_client import StompClient
from participants.stomp_core import Message

#: The application's work for one message, in the inbox row's transaction on ``conn``.
MessageHandler = Callable[[psycopg.Connection, Message], None]


class Reject(Exception):
    """Raised by a handler: this message can never be applied (dead-letter it, with why)."""


class ConsumerFailed(TwoPhaseCommitError):
    """The consumer met a failure that is not one message's fault, and stopped."""


@dataclass
class InboxStats:
    """What an inbox consumer did since it started."""

    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retries: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class InboxConsumer:
    """Consume ``destination`` until stopped; ``handler`` applies each message once."""

    def __init__(
        self,
        dsn: str,
        connect: Callable[[], StompClient],
        destination: str,
        handler: MessageHandler,
        *,
        tables: Tables | None = None,
        prefetch: int = 100,
        max_attempts: int = 6,
        retry_delay: float = 0.2,
        max_delay: float = 5.0,
        name: str = "inbox-consumer",
    ) -> None:
        if max_attempts < 1 or retry_delay <= 0 or max_delay < retry_delay:
            raise ValueError("max_attempts >= 1 and 0 < retry_delay <= max_delay")
        self.dsn = dsn
        self._open = connect
        self.destination = destination
        self.dead_letter_queue = dead_letter_queue(destination)
        self.handler = handler
        self.tables = tables or Tables()
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.max_delay = max_delay
        self.name = name
        self.stats = InboxStats()
        self.log = get_logger(component="inbox-consumer", consumer=name)
        self._stop = threading.Event()

    def _delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.retry_delay * 2 ** (min(attempt, 10) - 1)))

    def run(self, stop: threading.Event | None = None) -> InboxStats:
        """Consume until ``stop`` is set (checked every 0.25 s); reconnects after failures."""
        self._stop = stop = stop or threading.Event()
        self.log.info(ev.INBOX_CONSUMER_STARTED, destination=self.destination)
        failures = 0
        try:
            while not stop.is_set():
                client: StompClient | None = None
                db: psycopg.Connection | None = None
                try:
                    db = psycopg.connect(self.dsn, autocommit=True)
                    client = self._open()
                    subscription = client.subscribe(
                        self.destination, ack="client-individual", prefetch=self.prefetch
                    )
                    failures = 0
                    while not stop.is_set():
                        message = subscription.get(0.25)
                        if message is not None and not message.is_sentinel:
                            db = self._handle(client, db, message)
                        elif message is not None:
                            client.ack(message)  # a browse's sentinel: dropped
                    client.close()
                    client = None
                except (ParticipantError, psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    failures += 1
                    self.stats.reconnects += 1
                    self.log.warning(
                        ev.INBOX_CONSUMER_CONNECTION_LOST,
                        error=one_line(str(exc)),
                        attempt=failures,
                    )
                    stop.wait(self._delay(failures))
                finally:
                    if client is not None:
                        client.drop()  # unacknowledged messages go back to the queue
                    if db is not None:
                        db.close()
        finally:
            self.log.info(ev.INBOX_CONSUMER_STOPPED, **self.stats.as_dict())
        return self.stats

    def _handle(
        self, client: StompClient, db: psycopg.Connection, message: Message
    ) -> psycopg.Connection:
        """Apply one message (retrying transient failures), then ACK or dead-letter it."""
        key = message.headers.get(self.tables.key_header, "")
        reason, attempt = "", 0
        if not key:
            reason = f"no {self.tables.key_header} header"
        while not reason:
            attempt += 1
            try:
                outcome = receive(
                    db,
                    key,
                    lambda conn: self.handler(conn, message),
                    message_id=message.message_id,
                    tables=self.tables,
                )
            except Reject as exc:
                reason = str(exc) or "rejected by the handler"
            except (psycopg.IntegrityError, psycopg.DataError) as exc:
                reason = f"refused by the database: {one_line(str(exc), 200)}"
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.stats.retries += 1
                if attempt >= self.max_attempts:
                    reason = f"gave up after {attempt} attempts: {one_line(str(exc), 200)}"
                    break
                self.log.warning(
                    ev.INBOX_CONSUMER_RETRYING, attempt=attempt, key=key, error=one_line(str(exc))
                )
                if self._stop.wait(self._delay(attempt)):
                    return db  # not acknowledged: redelivered
                if db.closed or db.broken:
                    db.close()
                    db = psycopg.connect(self.dsn, autocommit=True)
            else:
                if outcome == APPLIED:
                    self.stats.applied += 1
                else:
                    self.stats.duplicates += 1
                client.ack(message)
                return db
        dead_letter(
            client, [Rejection(message, reason, max(attempt, 1))], destination=self.destination
        )
        self.stats.dead_lettered += 1
        self.log.error(
            ev.INBOX_CONSUMER_DEAD_LETTERED,
            key=key,
            message_id=message.message_id,
            reason=reason,
            dead_letter_queue=self.dead_letter_queue,
        )
        return db
