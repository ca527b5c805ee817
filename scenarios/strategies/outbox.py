"""The transactional outbox writers: debit, A's transfers row and an outbox row, one local commit.

Two ways to mark what the relay has sent (scenarios.outbox.relay):

* ``outbox-status``: the row is written ``status = 'pending'``; the status
  relay sends it and sets ``'sent'``.
* ``outbox-last-id``: the row is written with no status; the last-id relay
  remembers how far it got instead (per partition, in ``relay_positions``).

Both write through the outbox component's writer (outbox.writer), the row
keyed by transfer id. Nothing here writes to B or the broker: a relay publishes the row and the
consumer (scenarios.outbox.consumer) credits B. The writer reads B's account
ids once, at prepare, so that a transfer to an account B does not have is
refused before A is debited (the consumer could only dead-letter it, after A
had already paid).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from coordinator.states import Outcome
from outbox.message import OutboxMessage
from outbox.writer import write
from scenarios.config import Settings
from scenarios.crash_plan import CrashAction, CrashPlan
from scenarios.outbox.relay_modes import RelayMode
from scenarios.strategies.base import (
    ConnectionPool,
    accounts_of,
    crashed,
)
from scenarios.transfer.model import (
    CREDIT_COMMAND,
    CREDIT_QUEUE,
    DEBIT_TO,
    TYPE_HEADER,
    MissingAccount,
    Transfer,
    require_applied,
)
from scenarios.transfer.schema import TABLES


class LocalCommitWriter:
    """Debit A and record the message in a table of A, in one local transaction.

    With no ``insert`` (CDC) the debit is the whole transaction: the relay reads
    the business rows themselves.

    ``before_commit`` runs after the writes and before COMMIT (tests use it to
    hold transactions open, so that they commit out of id order).
    """

    crash_points: tuple[str, ...] = ("before-commit", "after-commit")

    def __init__(
        self,
        name: str,
        relay_mode: RelayMode,
        insert: str | None,
        *,
        status: str | None = None,
        destination: str = CREDIT_QUEUE,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.destination = destination
        self.relay_mode: RelayMode | None = relay_mode
        self.committed_at: dict[str, float] = {}
        self._insert = insert
        self._status = status
        self._before_commit = before_commit
        self._crashes = CrashPlan(name, self.crash_points)
        self._pool: ConnectionPool | None = None
        self._targets: frozenset[str] = frozenset()

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        self.close()
        self._crashes.arm_from_env()
        self._targets = accounts_of(settings.pg_b, setting="TWOPC_PG_B")
        self._pool = ConnectionPool(settings.pg_a, concurrency, setting="TWOPC_PG_A")

    def arm_crash(self, point: str, *, every: int = 1, action: CrashAction = "abandon") -> None:
        self._crashes.arm(point, every=every, action=action)

    def run_one(self, transfer: Transfer) -> tuple[Outcome, str]:
        if self._pool is None:
            raise RuntimeError(f"strategy {self.name}: call prepare(settings) before run_one")
        if transfer.target not in self._targets:
            return Outcome.ABORTED, str(MissingAccount(transfer.target, "b"))
        with self._pool.connection() as conn:
            try:
                with conn.cursor() as cur:
                    cur.execute(DEBIT_TO, transfer.debit())
                    require_applied(cur.rowcount, transfer.source, "a")
                    self.record(conn, cur, transfer)
            except MissingAccount as exc:
                conn.rollback()
                return Outcome.ABORTED, str(exc)
            except pg_errors.CheckViolation:
                conn.rollback()
                return Outcome.ABORTED, "insufficient funds in A"
            except pg_errors.UniqueViolation:
                conn.rollback()
                return Outcome.ABORTED, f"transfer {transfer.transfer_id} was already made"
            if self._before_commit is not None:
                self._before_commit()
            if self._crashes.hit("before-commit"):
                return crashed("before-commit")  # the pool closes the connection: rollback
            try:
                conn.commit()
            except psycopg.OperationalError as exc:
                return Outcome.IN_DOUBT, f"A's COMMIT got no answer: {exc}"
        self.committed_at[transfer.transfer_id] = time.time()
        if self._crashes.hit("after-commit"):
            return crashed("after-commit")
        return Outcome.COMMITTED, ""

    def record(self, conn: psycopg.Connection, cur: psycopg.Cursor, transfer: Transfer) -> None:
        """Write what the relay or job reads, in the debit's transaction (None: nothing)."""
        if self._insert is None:  # None: the debit is the whole transaction
            return
        cur.execute(
            self._insert,
            {
                "tid": transfer.transfer_id,
                "destination": self.destination,
                "body": transfer.body(),
                "status": self._status,
                "target": transfer.target,
                "amount": transfer.amount,
            },
        )

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


class OutboxWriter(LocalCommitWriter):
    """The outbox component's writer (outbox.writer.write) adds the credit command to the
    debit's transaction: what a team that picks the outbox would ship."""

    def messages(self, transfer: Transfer) -> list[OutboxMessage]:
        """What ``transfer``'s transaction adds to the outbox: its credit command."""
        return [
            OutboxMessage(
                transfer.transfer_id,
                self.destination,
                transfer.body(),
                {TYPE_HEADER: CREDIT_COMMAND},
            )
        ]

    def record(self, conn: psycopg.Connection, cur: psycopg.Cursor, transfer: Transfer) -> None:
        """Every message of :meth:`messages` in one write (one round trip)."""
        write(
            conn,
            self.messages(transfer),
            tables=TABLES,
            status="pending" if self._status else None,
        )


class OutboxStatusStrategy(OutboxWriter):
    """Outbox rows marked by a status column; any number of status relays share them."""

    def __init__(self, *, before_commit: Callable[[], None] | None = None) -> None:
        super().__init__(
            "outbox-status",
            "status",
            None,
            status="pending",
            before_commit=before_commit,
        )


class OutboxLastIdStrategy(OutboxWriter):
    """Outbox rows tracked by the last-id relays' recorded positions."""

    def __init__(self, *, before_commit: Callable[[], None] | None = None) -> None:
        super().__init__(
            "outbox-last-id", "last-id", None, status=None, before_commit=before_commit
        )
