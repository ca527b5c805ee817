"""The relays: read what the application committed to the outbox, publish it to the broker.

Delivery is at least once in every mode (a relay can die after publishing and
before recording that it did); the consumer's inbox (:mod:`outbox.inbox`)
makes the effect exactly once. Each batch goes to the broker in one STOMP
transaction, so one receipt covers it.

Modes:

``status`` (:class:`StatusRelay`)
    Rows with ``status = 'pending'``, taken with ``FOR UPDATE SKIP LOCKED`` so
    that any number of relays share the table, published, then set to
    ``'sent'`` in the same transaction. A relay sleeps on LISTEN (the outbox's
    insert trigger NOTIFYs at commit) with a fallback poll.

``last-id`` (:class:`LastIdRelay`)
    The relay remembers how far it got instead of marking rows. "The last id"
    alone is a trap: ids come from a sequence in allocation order, while rows
    become visible in commit order, so a row with a lower id can commit after
    a higher one has been sent and be skipped forever. Here the position is
    the pair (writer's transaction id, row id), and only rows written by
    transactions older than the oldest one still running are read::

        txid < pg_snapshot_xmin(pg_current_snapshot())

    Proof that nothing is skipped: every transaction with an id below that
    horizon has ended, so the set of rows below it is final and visible to
    the statement; reading them in (txid, id) order and recording the last
    pair sent means every row ordered before the position was read. A row
    written later has a txid at or above the horizon: it is read on a later
    round, after the position, in order.

    A relay is named (``name``): its positions are the rows
    ``<name>:<partition>`` of the positions table, one per partition of the
    outbox (``id % partitions``). Relays of one name *compete*: each works a
    partition only while it holds that partition's advisory lock, so they
    share the partitions and never send from the same position twice.
    Relays of different names are *independent*: each keeps its own
    positions and may publish to its own ``destination``, and all of them
    read the one outbox. Nothing they do touches the rows (no status to
    contend over), so neither slows nor blocks the other, and a restarted
    relay resumes from its own position.

Both wake on LISTEN (the outbox's insert trigger NOTIFYs at commit) with a
fallback poll, and with ``retain`` set delete the rows relayed longer ago
than that (:mod:`outbox.clean`).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import errors as pg_errors

from coordinator.errors import ParticipantError, TwoPhaseCommitError
from coordinator.events import get_logger
from outbox import events as ev
from outbox.clean import clean
from outbox.failures import Disposition, RetrySettings, deliver, record_failures
from outbox.message import OutboxMessage
from outbox.tables import Tables
from participants.stomp_client import StompClient


class StompPublisher:
    """Publishes a batch of messages in one broker transaction; reconnects after a failure.

    ``connect`` opens a STOMP connection (``StompClient.open(...)``). Each message
    goes out with ``default_headers`` and its own headers (a relay puts the key
    there, under ``Tables.key_header``); with ``key_header`` set, the key is
    added under that name too.
    """

    def __init__(
        self,
        connect: Callable[[], StompClient],
        *,
        key_header: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        receipt_timeout: float = 10.0,
    ) -> None:
        self._open = connect
        self.key_header = key_header
        self.default_headers = dict(default_headers or {})
        self.receipt_timeout = receipt_timeout
        self._client: StompClient | None = None
        self.messages_sent = 0

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """SEND every message (persistent) and COMMIT with a receipt; raises ParticipantError.

        After any failure the outcome of the batch is unknown: the connection is
        dropped and the caller sends the whole batch again (duplicates are fine).
        """
        if not messages:
            return
        client = self._client
        if client is None or not client.alive:
            client = self._client = self._open()
        transaction = f"relay-{secrets.token_hex(8)}"
        errors_before = client.error_count
        try:
            client.begin(transaction)
            for message in messages:
                client.send(
                    message.destination,
                    message.body,
                    self.headers_for(message),
                    transaction=transaction,
                )
            client.commit(transaction, self.receipt_timeout)
            refused = client.errors_since(errors_before)
            if refused:
                raise ParticipantError(
                    f"the broker refused part of the batch: {refused[0]}",
                    participant="relay-broker",
                )
        except TwoPhaseCommitError:
            self.drop()
            raise
        self.messages_sent += len(messages)

    def headers_for(self, message: OutboxMessage) -> dict[str, str]:
        """The headers ``message`` goes out with: ``default_headers``, its own, and its key
        under ``key_header``. A subclass may add what depends on the destination."""
        headers = {**self.default_headers, **message.headers}
        if self.key_header:
            headers[self.key_header] = message.key
        return headers

    def drop(self) -> None:
        if self._client is not None:
            self._client.drop()
            self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class Publisher:
    """What a relay publishes through (:class:`StompPublisher`, or a test's stand-in)."""

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@dataclass
class RelayConfig:
    """How a relay batches, sleeps, handles failures and cleans up."""

    batch_size: int = 200
    poll_interval: float = 1.0  # fallback poll when no NOTIFY comes
    retry: RetrySettings = field(default_factory=RetrySettings)
    name: str = ""  # shows in the logs; defaults to mode-<random>
    retain: float | None = None  # seconds relayed rows are kept; None: never deleted here
    clean_batch: int = 1000  # rows per DELETE of the clean-up


@dataclass
class RelayStats:
    """What a relay did since it started."""

    sent: int = 0
    failed: int = 0
    ignored: int = 0
    batches: int = 0
    replays_skipped: int = 0
    unexplained: int = 0  # CDC: decoded changes that are no transfer (logged, not sent)
    cleaned: int = 0  # outbox rows this relay deleted (``retain``)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Stopped(Exception):
    """Shutdown was asked in the middle of a batch: roll back, record nothing."""


class RelayFailed(TwoPhaseCommitError):
    """The relay met an error it cannot work around (A without its tables, a bug) and stopped."""


class Relay:
    """The loop every mode shares: pump batches until none is left, then wait for work."""

    mode: str = "status"
    listens = True  # whether NOTIFY wakes this mode

    def __init__(
        self,
        dsn: str,
        publisher: StompPublisher | Publisher,
        config: RelayConfig | None = None,
        *,
        tables: Tables | None = None,
    ) -> None:
        self.dsn = dsn
        self.config = config or RelayConfig()
        self.publisher = publisher
        self.tables = tables or Tables()
        self.name = self.config.name or f"{self.mode}-{secrets.token_hex(2)}"
        self.stats = RelayStats()
        self.log = get_logger(component="relay", mode=self.mode, relay=self.name)
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._listen: psycopg.Connection | None = None
        self._next_clean = 0.0

    # -- hooks for a relay built on this one -----------------------------------------

    def abandon_after_publish(self) -> bool:
        """True to abandon the batch just published, unrecorded (a crash test's hook)."""
        return False

    def failure_hint(self, exc: Exception) -> str:
        """What to run when ``exc`` stopped the relay (appended to RelayFailed's text)."""
        if isinstance(exc, pg_errors.UndefinedTable):
            return "; create the outbox tables first (outbox.tables.Tables.schema_a)"
        return ""

    # -- the loop ------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> RelayStats:
        """Relay until ``stop`` is set; survives A and the broker going away and coming back.

        Any other error stops it as RelayFailed, one line that says what happened.
        """
        self._stop = stop or threading.Event()
        self.log.info(ev.RELAY_STARTED, policy=self.config.retry.policy.value)
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._connect()
                    while not self._stop.is_set():
                        if self.pump_once() == 0:
                            self._clean_if_due()
                            self._wait_for_work()
                        failures = 0
                except Stopped:
                    break
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    failures += 1
                    self.log.warning(
                        ev.RELAY_DATABASE_LOST, error=str(exc).strip(), attempt=failures
                    )
                    self._disconnect()
                    self._stop.wait(self.config.retry.delay(min(failures, 6)))
        except Exception as exc:
            error = " ".join(f"{type(exc).__name__}: {exc}".split())
            failed = RelayFailed(f"relay {self.name} stopped: {error}{self.failure_hint(exc)}")
            self.log.error(ev.RELAY_FAILED, error=str(failed))
            raise failed from exc
        finally:
            self._disconnect()
            self.publisher.close()
            self.log.info(ev.RELAY_STOPPED, **self.stats.as_dict())
        return self.stats

    def pump_once(self) -> int:
        """Handle one batch; return how many messages it held (0: nothing to do)."""
        raise NotImplementedError

    def _connect(self) -> None:
        # The name shows in pg_stat_activity: which relay holds which advisory lock.
        name = f"twopc relay {self.name}"[:63]
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, application_name=name)
        if self.listens and (self._listen is None or self._listen.closed):
            self._listen = psycopg.connect(self.dsn, autocommit=True, application_name=name)
            self._listen.execute(f"LISTEN {self.tables.channel}")

    def _disconnect(self) -> None:
        for conn in (self._conn, self._listen):
            if conn is not None:
                conn.close()
        self._conn = self._listen = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None:
            raise RuntimeError("the relay is not connected")
        return self._conn

    def _wait_for_work(self) -> None:
        """Sleep until a NOTIFY, the fallback poll, or shutdown (checked every 0.25 s)."""
        deadline = time.monotonic() + self.config.poll_interval
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._listen is None:
                self._stop.wait(min(left, 0.25))
                continue
            woke = False
            for _ in self._listen.notifies(timeout=min(left, 0.25), stop_after=1):
                woke = True
            if woke:
                return

    def _clean_if_due(self) -> None:
        """With ``retain`` set, delete rows relayed longer ago, at most every retain/4 s
        (between 1 and 60 s), at most 10 batches at a time."""
        retain = self.config.retain
        if retain is None or time.monotonic() < self._next_clean:
            return
        self._next_clean = time.monotonic() + min(60.0, max(1.0, retain / 4))
        report = clean(
            self.conn,
            older_than=retain,
            batch_size=self.config.clean_batch,
            max_batches=10,
            tables=self.tables,
            stop=self._stop,
            source=self.name,
        )
        self.stats.cleaned += report.deleted

    def _deliver(self, batch: Sequence[OutboxMessage]) -> tuple[Disposition, int, str]:
        disposition, attempts, error = deliver(
            self.publisher.publish, batch, self.config.retry, self._stop, source=self.mode
        )
        if disposition is Disposition.STOPPED:
            raise Stopped()
        if disposition is Disposition.SENT and self.abandon_after_publish():
            raise Stopped()  # abandon: as if the process died before recording
        self.stats.batches += 1
        if disposition is Disposition.SENT:
            self.stats.sent += len(batch)
        elif disposition is Disposition.FAILED:
            self.stats.failed += len(batch)
        else:
            self.stats.ignored += len(batch)
            self.log.warning(ev.RELAY_IGNORED, messages=len(batch), error=error)
        self.log.debug(ev.RELAY_BATCH, messages=len(batch), outcome=disposition.value)
        return disposition, attempts, error

    def _record_failures(
        self, batch: Sequence[OutboxMessage], attempts: int, error: str, source: str = ""
    ) -> None:
        record_failures(
            self.conn,
            batch,
            source=source or self.mode,
            attempts=attempts,
            error=error,
            tables=self.tables,
        )

    def _message(
        self, key: str, destination: str, headers: Mapping[str, str] | None, body: str
    ) -> OutboxMessage:
        """A row as the relay publishes it: its headers and its key under ``key_header``."""
        return OutboxMessage(
            key, destination, body, {**(headers or {}), self.tables.key_header: key}
        )


# -- status column --------------------------------------------------------------------


class StatusRelay(Relay):
    """Sends ``pending`` rows and marks them ``sent``; shares the table with other relays."""

    mode = "status"

    def pump_once(self) -> int:
        t = self.tables
        with self.conn.transaction():
            rows = self.conn.execute(
                f"SELECT id, {t.key}, destination, headers, body FROM {t.outbox} "
                "WHERE status = 'pending' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                (self.config.batch_size,),
            ).fetchall()
            if not rows:
                return 0
            ids = [row[0] for row in rows]
            batch = [self._message(row[1], row[2], row[3], row[4]) for row in rows]
            disposition, attempts, error = self._deliver(batch)
            if disposition is Disposition.FAILED:
                self._record_failures(batch, attempts, error)
            status = {Disposition.SENT: "sent", Disposition.FAILED: "failed"}.get(
                disposition, "ignored"
            )
            self.conn.execute(
                f"UPDATE {t.outbox} SET status = %s, sent_at = clock_timestamp() "
                "WHERE id = ANY(%s)",
                (status, ids),
            )
        return len(rows)


# -- last sent id ---------------------------------------------------------------------


class LastIdRelay(Relay):
    """Remembers (txid, id) of the last row sent, per partition; reads only below the horizon.

    ``position``: the name its positions are kept under (relays of one name
    compete for its partitions; relays of different names are independent).
    ``partitions``: the outbox's (``Tables.schema_a(partitions=...)``).
    ``destination``: where it publishes every message (None: each row's own).
    """

    mode = "last-id"

    def __init__(
        self,
        dsn: str,
        publisher: StompPublisher | Publisher,
        config: RelayConfig | None = None,
        *,
        tables: Tables | None = None,
        position: str = "last-id",
        partitions: int = 1,
        destination: str | None = None,
    ) -> None:
        super().__init__(dsn, publisher, config, tables=tables)
        if partitions < 1 or not position or ":" in position:
            raise ValueError(f"last-id relay {position!r}: a name without ':', partitions >= 1")
        self.position = position
        self.partitions = partitions
        self.destination = destination
        self._order = itertools.cycle(range(partitions))
        self._registered = False

    def _connect(self) -> None:
        super()._connect()
        if not self._registered:
            self.register()

    def register(self) -> None:
        """Make this relay's positions (at the table's start) where they do not exist yet."""
        t = self.tables
        created = self.conn.execute(
            f"INSERT INTO {t.positions} (name, last_txid, last_id, part, destination) "
            "SELECT %(name)s || ':' || p, '0', 0, p, %(destination)s "
            "FROM generate_series(0, %(last)s) p ON CONFLICT (name) DO NOTHING",
            {"name": self.position, "last": self.partitions - 1, "destination": self.destination},
        ).rowcount
        if created:
            self.log.info(ev.RELAY_POSITION_CREATED, position=self.position, partitions=created)
        self._registered = True

    def pump_once(self) -> int:
        handled = 0
        start = next(self._order)  # start elsewhere each round: relays spread out
        for step in range(self.partitions):
            partition = (start + step) % self.partitions
            lock = f"{self.tables.positions}:{self.position}:{partition}"
            locked = self.conn.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s))", (lock,)
            ).fetchone()
            if not (locked and locked[0]):
                continue  # another relay of this name works this partition now
            try:
                handled += self._pump_partition(partition)
            finally:
                if not self.conn.closed:
                    self.conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock,))
        return handled

    def _pump_partition(self, partition: int) -> int:
        t = self.tables
        name = f"{self.position}:{partition}"
        position = self.conn.execute(
            f"SELECT last_txid, last_id FROM {t.positions} WHERE name = %s", (name,)
        ).fetchone()
        if position is None:
            raise TwoPhaseCommitError(
                f"{t.positions} has no row {name!r} (deleted while relay {self.name} ran?)"
            )
        # The horizon is an InitPlan: computed once, from the statement's own snapshot.
        rows = self.conn.execute(
            f"SELECT id, txid, {t.key}, destination, headers, body FROM {t.outbox} "
            "WHERE part = %(part)s AND status IS NULL "
            "AND txid < (SELECT pg_snapshot_xmin(pg_current_snapshot())) "
            "AND (txid, id) > (%(txid)s::xid8, %(id)s::bigint) "
            "ORDER BY txid, id LIMIT %(limit)s",
            {
                "part": partition,
                "txid": str(position[0]),
                "id": position[1],
                "limit": self.config.batch_size,
            },
        ).fetchall()
        if not rows:
            return 0
        batch = [self._message(row[2], self.destination or row[3], row[4], row[5]) for row in rows]
        disposition, attempts, error = self._deliver(batch)
        last_id, last_txid = rows[-1][0], rows[-1][1]
        with self.conn.transaction():
            if disposition is Disposition.FAILED:
                # The rows are not marked: other relays read them too. The failure log
                # keeps them, per (key, destination), for a retry.
                self._record_failures(batch, attempts, error, source=self.position)
            self.conn.execute(
                f"UPDATE {t.positions} SET last_txid = %s::xid8, last_id = %s, "
                "updated_at = clock_timestamp() WHERE name = %s",
                (str(last_txid), last_id, name),
            )
        return len(rows)
