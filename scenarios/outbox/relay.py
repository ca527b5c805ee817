"""The transfer scenario's relays: the outbox component's, and the CDC relay.

The ``status`` and ``last-id`` relays are the outbox component's
(:mod:`outbox.relay`, which explains both modes and why last-id reads only
below the oldest running transaction), run on the transfer scenario's tables
(keyed by transfer id, ``LAST_ID_PARTITIONS`` partitions) with a crash point
for the tests. Messages go out as credit commands (``type: transfer.credit``)
unless their row says otherwise. The last-id relays the ``outbox-last-id``
strategy runs share the name ``last-id`` and compete for its partitions;
``twopc relay --mode last-id --name NAME --destination QUEUE`` starts an
independent one, with its own positions (docs/outbox.md).

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

import time
from typing import Any

from psycopg import errors as pg_errors

from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from outbox import relay as component
from outbox.message import OutboxMessage
from outbox.relay import RelayConfig as RelayConfig
from outbox.relay import RelayFailed as RelayFailed
from outbox.relay import RelayStats as RelayStats
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.crash_plan import CrashPlan
from scenarios.outbox.cdc import describe, ensure_slot, explain, peek
from scenarios.outbox.failures import Disposition, OutMessage
from scenarios.outbox.pgoutput import lsn_text, lsn_value
from scenarios.outbox.relay_modes import RELAY_MODES, RelayMode
from scenarios.transfer.model import CREDIT_COMMAND, CREDIT_QUEUE, TYPE_HEADER, relayed_type
from scenarios.transfer.schema import CDC_SLOT, LAST_ID_PARTITIONS, TABLES
from scenarios.wiring import open_stomp

#: The channel the outbox triggers NOTIFY on.
CHANNEL = TABLES.channel

#: The CDC relays' advisory lock (one decodes the slot at a time).
LOCK_CLASS = 0x74706331
CDC_LOCK = 1000

#: Seconds between two looks at A's WAL position while the CDC relay waits for work.
WAL_WATCH_INTERVAL = 0.02

#: Environment variable arming a relay crash: ``after-publish=kill@3`` SIGKILLs the
#: relay on its third batch, after the broker took it and before it was recorded.
RELAY_CRASH_SETTING = "TWOPC_RELAY_CRASH"
RELAY_CRASH_POINTS = ("after-publish",)

#: The name the last-id relays of the outbox-last-id strategy share their positions under.
LAST_ID_POSITION = "last-id"


class StompPublisher(component.StompPublisher):
    """The component's publisher on the settings' broker: credit commands keyed by transfer id."""

    def __init__(self, settings: Settings, *, receipt_timeout: float = 10.0) -> None:
        super().__init__(
            lambda: open_stomp(settings, participant="relay-broker"),
            key_header=TABLES.key_header,
            default_headers={TYPE_HEADER: CREDIT_COMMAND},
            receipt_timeout=receipt_timeout,
        )
        self.settings = settings
        self.address = settings.stomp

    def headers_for(self, message: OutboxMessage) -> dict[str, str]:
        """Each message gets the kind its destination carries: on a queue the command to
        credit B (``type: transfer.credit``), on the events' topic the event that A
        committed the transfer (``transfer.completed``; the CDC fan-out)."""
        return {
            **super().headers_for(message),
            TYPE_HEADER: relayed_type(message.destination),
        }


class _ScenarioRelay(component.Relay):
    """A component relay with the scenario's settings, crash point and hints."""

    def __init__(
        self,
        settings: Settings,
        config: RelayConfig | None = None,
        *,
        publisher: StompPublisher | None = None,
        **options: Any,
    ) -> None:
        self.settings = settings
        self.crashes = CrashPlan(f"relay {self.mode}", RELAY_CRASH_POINTS)
        super().__init__(
            settings.pg_a, publisher or StompPublisher(settings), config, tables=TABLES, **options
        )

    def run(self, stop: Any = None) -> RelayStats:
        self.crashes.arm_from_env(RELAY_CRASH_SETTING)
        return super().run(stop)

    def abandon_after_publish(self) -> bool:
        return self.crashes.hit("after-publish")

    def failure_hint(self, exc: Exception) -> str:
        if isinstance(exc, pg_errors.UndefinedTable):
            return "; run 'twopc transfer --reset' to create the tables"
        return ""


# The scenario's relays put their own class first, so that its __init__ runs.
Relay = _ScenarioRelay


class StatusRelay(_ScenarioRelay, component.StatusRelay):
    """Sends ``pending`` rows and marks them ``sent``; shares the table with other relays."""

    mode: RelayMode = "status"


class LastIdRelay(_ScenarioRelay, component.LastIdRelay):
    """Last-id positions per partition; ``position`` names them (default: the strategy's)."""

    mode: RelayMode = "last-id"

    def __init__(
        self,
        settings: Settings,
        config: RelayConfig | None = None,
        *,
        publisher: StompPublisher | None = None,
        position: str = LAST_ID_POSITION,
        destination: str | None = None,
    ) -> None:
        super().__init__(
            settings,
            config,
            publisher=publisher,
            position=position,
            partitions=LAST_ID_PARTITIONS,
            destination=destination,
        )


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
                    self._record_failures(batch, attempts, error)
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


RELAYS: dict[RelayMode, type[_ScenarioRelay]] = {
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
    position: str | None = None,
    destination: str | None = None,
) -> _ScenarioRelay:
    """A relay of ``mode`` ('status', 'last-id' or 'cdc').

    Last-id only: ``position``, the name of an independent relay's positions
    (default: the strategy's shared ``last-id``), and ``destination``, where it
    publishes every message (default: each row's own).
    """
    if mode not in RELAYS:
        raise ConfigurationError(f"unknown relay mode {mode!r}; one of {', '.join(RELAY_MODES)}")
    if mode != "last-id":
        if position or destination:
            raise ConfigurationError("a position name and a destination are last-id options")
        return RELAYS[mode](settings, config, publisher=publisher)
    return LastIdRelay(
        settings,
        config,
        publisher=publisher,
        position=position or LAST_ID_POSITION,
        destination=destination,
    )
