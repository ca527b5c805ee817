"""The relays: read what A committed for the broker, publish it to /queue/transfers.credit.

Delivery is at least once in every mode (a relay can die after publishing and
before recording that it did); the consumer's inbox makes the effect exactly
once. Each batch goes to the broker in one STOMP transaction, so one receipt
covers it.

Modes:

``status``
    Rows with ``status = 'pending'``, taken with ``FOR UPDATE SKIP LOCKED`` so
    that any number of relays share the table, published, then set to
    ``'sent'`` in the same transaction. A relay sleeps on LISTEN (the outbox's
    insert trigger NOTIFYs at commit) with a fallback poll.

``last-id``
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
    round, after the position, in order. The rows are split into
    ``LAST_ID_PARTITIONS`` partitions (``id % n``), each with its own
    position; a relay works a partition only while it holds that partition's
    advisory lock, so several relays share the partitions and never send
    from the same position twice.

``cdc``
    Logical decoding of A's business tables (``transfers``, ``accounts``)
    through pgoutput and the SQL functions (psycopg has no replication
    protocol; docs/design.md §8 says why this is not psycopg2's):
    ``pg_logical_slot_peek_binary_changes`` on the ``twopc_cdc`` slot,
    decoded by scenarios.outbox.pgoutput; each committed transfer becomes its
    credit command (scenarios.outbox.cdc.explain), published to the
    destination recorded in ``relay_positions``; then the last commit's end
    LSN is recorded there, then ``pg_replication_slot_advance``. Peek, not
    get: get would consume the changes before they are published. A replay
    after a crash (the slot's position is written at checkpoints, so it can
    go back) is skipped up to the recorded LSN, and anything else the
    consumer deduplicates. Changes no transfer explains (a balance corrected
    by hand) are logged and counted, never sent: the WAL says what changed,
    not why. One relay decodes at a time (an advisory lock); others wait as
    hot standbys. Nothing on A notifies the relay (the writer adds nothing to
    its transaction): it watches A's WAL insert position every
    ``WAL_WATCH_INTERVAL`` and peeks when it moved, or every ``poll_interval``.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from coordinator.errors import ConfigurationError, ParticipantError, TwoPhaseCommitError
from coordinator.events import get_logger
from participants.stomp_client import StompClient
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.crash_plan import CrashPlan
from scenarios.outbox.cdc import describe, ensure_slot, explain, peek
from scenarios.outbox.failures import (
    Disposition,
    OutMessage,
    RetrySettings,
    deliver,
    record_failures,
)
from scenarios.outbox.pgoutput import lsn_text, lsn_value
from scenarios.outbox.relay_modes import RELAY_MODES, RelayMode
from scenarios.transfer.model import CREDIT_QUEUE, TYPE_HEADER, relayed_type
from scenarios.transfer.schema import CDC_SLOT, LAST_ID_PARTITIONS
from scenarios.wiring import open_stomp

#: The channel the outbox triggers NOTIFY on.
CHANNEL = "twopc_outbox"

#: First key of the relays' advisory locks (the second is the partition, or CDC_LOCK).
LOCK_CLASS = 0x74706331
CDC_LOCK = 1000

#: Seconds between two looks at A's WAL position while the CDC relay waits for work.
WAL_WATCH_INTERVAL = 0.02

#: Environment variable arming a relay crash: ``after-publish=kill@3`` SIGKILLs the
#: relay on its third batch, after the broker took it and before it was recorded.
RELAY_CRASH_SETTING = "TWOPC_RELAY_CRASH"
RELAY_CRASH_POINTS = ("after-publish",)


class StompPublisher:
    """Publishes a batch of messages in one broker transaction; reconnects after a failure."""

    def __init__(self, settings: Settings, *, receipt_timeout: float = 10.0) -> None:
        self.settings = settings
        self.address = settings.stomp
        self.receipt_timeout = receipt_timeout
        self._client: StompClient | None = None
        self.messages_sent = 0

    def publish(self, messages: Sequence[OutMessage]) -> None:
        """SEND every message (persistent) and COMMIT with a receipt; raises ParticipantError.

        Each message gets the kind its destination carries: on a queue the command to
        credit B (``type: transfer.credit``), on the events' topic the event that A
        committed the transfer (``transfer.completed``; the CDC fan-out).

        After any failure the outcome of the batch is unknown: the connection is
        dropped and the caller sends the whole batch again (duplicates are fine).
        """
        if not messages:
            return
        client = self._client
        if client is None or not client.alive:
            client = self._client = open_stomp(self.settings, participant="relay-broker")
        transaction = f"relay-{secrets.token_hex(8)}"
        errors_before = client.error_count
        try:
            client.begin(transaction)
            for message in messages:
                client.send(
                    message.destination,
                    message.body,
                    {
                        "transfer-id": message.transfer_id,
                        TYPE_HEADER: relayed_type(message.destination),
                    },
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

    def drop(self) -> None:
        if self._client is not None:
            self._client.drop()
            self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@dataclass
class RelayConfig:
    """How a relay batches, sleeps and handles failures."""

    batch_size: int = 200
    poll_interval: float = 1.0  # fallback poll when no NOTIFY comes (cdc: between peeks)
    retry: RetrySettings = field(default_factory=RetrySettings)
    name: str = ""  # shows in the logs; defaults to mode-pid


@dataclass
class RelayStats:
    """What a relay did since it started."""

    sent: int = 0
    failed: int = 0
    ignored: int = 0
    batches: int = 0
    replays_skipped: int = 0
    unexplained: int = 0  # CDC: decoded changes that are no transfer (logged, not sent)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Stopped(Exception):
    """Shutdown was asked in the middle of a batch: roll back, record nothing."""


class RelayFailed(TwoPhaseCommitError):
    """The relay met an error it cannot work around (A without its tables, a bug) and stopped."""


class Relay:
    """The loop every mode shares: pump batches until none is left, then wait for work."""

    mode: RelayMode = "status"
    listens = True  # whether NOTIFY wakes this mode

    def __init__(
        self,
        settings: Settings,
        config: RelayConfig | None = None,
        *,
        publisher: StompPublisher | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or RelayConfig()
        self.publisher = publisher or StompPublisher(settings)
        self.name = self.config.name or f"{self.mode}-{secrets.token_hex(2)}"
        self.stats = RelayStats()
        self.crashes = CrashPlan(f"relay {self.mode}", RELAY_CRASH_POINTS)
        self.log = get_logger(component="relay", mode=self.mode, relay=self.name)
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._listen: psycopg.Connection | None = None

    # -- the loop ------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> RelayStats:
        """Relay until ``stop`` is set; survives A and the broker going away and coming back.

        Any other error stops it as RelayFailed, one line that says what happened.
        """
        self._stop = stop or threading.Event()
        self.crashes.arm_from_env(RELAY_CRASH_SETTING)
        self.log.info(ev.RELAY_STARTED, policy=self.config.retry.policy.value)
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._connect()
                    while not self._stop.is_set():
                        if self.pump_once() == 0:
                            self._wait_for_work()
                        failures = 0
                except _Stopped:
                    break
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    failures += 1
                    self.log.warning(
                        ev.RELAY_DATABASE_LOST, error=str(exc).strip(), attempt=failures
                    )
                    self._disconnect()
                    self._stop.wait(self.config.retry.delay(min(failures, 6)))
        except Exception as exc:
            hint = (
                "; run 'twopc transfer --reset' to create the tables"
                if isinstance(exc, pg_errors.UndefinedTable)
                else ""
            )
            error = " ".join(f"{type(exc).__name__}: {exc}".split())
            failed = RelayFailed(f"relay {self.name} stopped: {error}{hint}")
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
            self._conn = psycopg.connect(self.settings.pg_a, autocommit=True, application_name=name)
        if self.listens and (self._listen is None or self._listen.closed):
            self._listen = psycopg.connect(
                self.settings.pg_a, autocommit=True, application_name=name
            )
            self._listen.execute(f"LISTEN {CHANNEL}")

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

    def _deliver(self, batch: Sequence[OutMessage]) -> tuple[Disposition, int, str]:
        disposition, attempts, error = deliver(
            self.publisher.publish, batch, self.config.retry, self._stop, source=self.mode
        )
        if disposition is Disposition.STOPPED:
            raise _Stopped()
        if disposition is Disposition.SENT and self.crashes.hit("after-publish"):
            raise _Stopped()  # abandon: as if the process died before recording
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


# -- status column --------------------------------------------------------------------


class StatusRelay(Relay):
    """Sends ``pending`` rows and marks them ``sent``; shares the table with other relays."""

    mode: RelayMode = "status"

    def pump_once(self) -> int:
        with self.conn.transaction():
            rows = self.conn.execute(
                "SELECT id, transfer_id, destination, body FROM outbox "
                "WHERE status = 'pending' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                (self.config.batch_size,),
            ).fetchall()
            if not rows:
                return 0
            ids = [row[0] for row in rows]
            batch = [OutMessage(row[1], row[2], row[3]) for row in rows]
            disposition, attempts, error = self._deliver(batch)
            if disposition is Disposition.FAILED:
                record_failures(self.conn, batch, source=self.mode, attempts=attempts, error=error)
            status = {Disposition.SENT: "sent", Disposition.FAILED: "failed"}.get(
                disposition, "ignored"
            )
            self.conn.execute(
                "UPDATE outbox SET status = %s, sent_at = clock_timestamp() WHERE id = ANY(%s)",
                (status, ids),
            )
        return len(rows)


# -- last sent id ---------------------------------------------------------------------


class LastIdRelay(Relay):
    """Remembers (txid, id) of the last row sent, per partition; reads only below the horizon."""

    mode: RelayMode = "last-id"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._order = itertools.cycle(range(LAST_ID_PARTITIONS))

    def pump_once(self) -> int:
        handled = 0
        start = next(self._order)  # start elsewhere each round: relays spread out
        for step in range(LAST_ID_PARTITIONS):
            partition = (start + step) % LAST_ID_PARTITIONS
            locked = self.conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, partition)
            ).fetchone()
            if not (locked and locked[0]):
                continue  # another relay works this partition now
            try:
                handled += self._pump_partition(partition)
            finally:
                if not self.conn.closed:
                    self.conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, partition))
        return handled

    def _pump_partition(self, partition: int) -> int:
        name = f"last-id:{partition}"
        position = self.conn.execute(
            "SELECT last_txid, last_id FROM relay_positions WHERE name = %s", (name,)
        ).fetchone()
        if position is None:
            raise TwoPhaseCommitError(
                f"relay_positions has no row {name!r}: run 'twopc transfer --reset' first"
            )
        # The horizon is an InitPlan: computed once, from the statement's own snapshot.
        rows = self.conn.execute(
            "SELECT id, txid, transfer_id, destination, body FROM outbox "
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
        batch = [OutMessage(row[2], row[3], row[4]) for row in rows]
        disposition, attempts, error = self._deliver(batch)
        last_id, last_txid = rows[-1][0], rows[-1][1]
        with self.conn.transaction():
            if disposition is not Disposition.SENT:
                ids = [row[0] for row in rows]
                if disposition is Disposition.FAILED:
                    record_failures(
                        self.conn, batch, source=self.mode, attempts=attempts, error=error
                    )
                self.conn.execute(
                    "UPDATE outbox SET status = %s WHERE id = ANY(%s)",
                    (disposition.value, ids),
                )
            self.conn.execute(
                "UPDATE relay_positions SET last_txid = %s::xid8, last_id = %s, "
                "updated_at = clock_timestamp() WHERE name = %s",
                (str(last_txid), last_id, name),
            )
        return len(rows)


# -- CDC ------------------------------------------------------------------------------


class CdcRelay(Relay):
    """Peek -> publish -> record -> advance, on the pgoutput slot of A's business tables."""

    mode: RelayMode = "cdc"
    listens = False  # nothing on A notifies: the writer adds nothing to its transaction

    def __init__(self, *args: Any, slot: str = CDC_SLOT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot = slot
        self._leader = False
        self._standby_logged = False

    def _connect(self) -> None:
        if self._conn is None or self._conn.closed:
            self._leader = False  # the advisory lock went with the old session
        super()._connect()

    def pump_once(self) -> int:
        if not self._lead():
            return 0
        recorded = self.conn.execute(
            "SELECT lsn::text, destination FROM relay_positions WHERE name = 'cdc'"
        ).fetchone()
        if recorded is None:
            raise TwoPhaseCommitError(
                "relay_positions has no row 'cdc': run 'twopc transfer --reset' first"
            )
        recorded_lsn = lsn_value(recorded[0]) if recorded[0] else None
        destination = recorded[1] or CREDIT_QUEUE
        try:
            transactions = peek(self.conn, self.slot, changes=self.config.batch_size * 5)
        except pg_errors.UndefinedObject:
            if ensure_slot(self.settings.pg_a, self.slot):
                self.log.warning(
                    ev.RELAY_CDC_SLOT_CREATED,
                    slot=self.slot,
                    note="changes committed before now were not decoded",
                )
            return 0
        if not transactions:
            return 0
        last_lsn = lsn_text(transactions[-1].end_lsn)
        batch: list[OutMessage] = []
        for transaction in transactions:
            explained = explain(transaction, destination)
            if recorded_lsn is not None and transaction.end_lsn <= recorded_lsn:
                self.stats.replays_skipped += len(explained.credits)
                continue
            batch += explained.credits
            for change in explained.unexplained:
                self.stats.unexplained += 1
                self.log.info(
                    ev.RELAY_CDC_UNEXPLAINED,
                    change=describe(change),
                    xid=transaction.xid,
                    lsn=lsn_text(transaction.end_lsn),
                )
        if batch:
            disposition, attempts, error = self._deliver(batch)
            with self.conn.transaction():
                if disposition is Disposition.FAILED:
                    record_failures(
                        self.conn, batch, source=self.mode, attempts=attempts, error=error
                    )
                self.conn.execute(
                    "UPDATE relay_positions SET lsn = %s::pg_lsn, updated_at = clock_timestamp()"
                    " WHERE name = 'cdc'",
                    (last_lsn,),
                )
        # Transactions without credits (corrections, other writers) need no record to be
        # advanced past; recording would only write more rows to A.
        self.conn.execute(
            "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, last_lsn)
        )
        return len(batch) or len(transactions)

    def _wait_for_work(self) -> None:
        """Sleep until A's WAL moves (checked every WAL_WATCH_INTERVAL), the poll, or shutdown.

        Nothing on A notifies the relay (the writer adds nothing to its
        transaction), and a peek decodes the slot from its position, so the relay
        watches the cheap WAL insert position instead and peeks once it moved.
        """
        if not self._leader:  # a standby only tries the lock again, every poll_interval
            self._stop.wait(self.config.poll_interval)
            return
        deadline = time.monotonic() + self.config.poll_interval
        start = self._wal_position()
        while not self._stop.wait(min(WAL_WATCH_INTERVAL, self.config.poll_interval)):
            if time.monotonic() >= deadline or self._wal_position() != start:
                return

    def _wal_position(self) -> str:
        row = self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        return str(row[0]) if row else ""

    def _lead(self) -> bool:
        """Hold the CDC advisory lock: only one relay decodes the slot at a time."""
        if not self._leader:
            row = self.conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, CDC_LOCK)
            ).fetchone()
            self._leader = bool(row and row[0])
            if self._leader:
                ensure_slot(self.settings.pg_a, self.slot)
                self.log.info(ev.RELAY_CDC_LEADING, slot=self.slot)
            elif not self._standby_logged:
                self._standby_logged = True
                self.log.info(ev.RELAY_CDC_STANDBY, note="another relay decodes the slot")
        return self._leader


RELAYS: dict[RelayMode, type[Relay]] = {
    "status": StatusRelay,
    "last-id": LastIdRelay,
    "cdc": CdcRelay,
}


def make_relay(
    mode: RelayMode,
    settings: Settings,
    config: RelayConfig | None = None,
    *,
    publisher: StompPublisher | None = None,
) -> Relay:
    """A relay of ``mode`` ('status', 'last-id' or 'cdc')."""
    if mode not in RELAYS:
        raise ConfigurationError(f"unknown relay mode {mode!r}; one of {', '.join(RELAY_MODES)}")
    return RELAYS[mode](settings, config, publisher=publisher)
