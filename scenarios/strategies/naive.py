"""The naive dual write: commit A, then commit B, then send — with no coordination at all.

The baseline: each step is durable on its own, and a crash (or a failure)
between two steps leaves A, B and the events disagreeing for good. Nothing
retries and nothing repairs; the anomaly count of the report comes from here.
Wrong input is another matter: a transfer to an account B does not have (its
ids are read at prepare) or from one A does not have is refused before any
commit, so that only crashes and failures make the anomalies. A transfer A
refuses for lack of funds is announced as a ``transfer.refused`` event.

``naive-send-first`` (:class:`NaiveSendFirstStrategy`) sends the
``transfer.completed`` event *before* A's transaction ends, the mistake the
rule "send after the transaction ends" is about: when that transaction then
rolls back (lack of funds found after the send, or a failure), the event
announces a transfer that never happened, and no one can take it back.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from coordinator.errors import ParticipantError
from coordinator.states import Outcome
from participants.stomp_client import StompClient
from scenarios.config import Settings
from scenarios.crash_plan import CrashAction, CrashPlan
from scenarios.outbox.relay_modes import RelayMode
from scenarios.strategies.base import (
    INSUFFICIENT_FUNDS,
    ConnectionPool,
    accounts_of,
    commit_debit,
    crashed,
)
from scenarios.transfer.destinations import EVENT_QUEUES
from scenarios.transfer.model import (
    CREDIT,
    DEBIT_TO,
    EVENT_TOPIC,
    TRANSFER_COMPLETED,
    TRANSFER_REFUSED,
    MissingAccount,
    Transfer,
    require_applied,
)
from scenarios.wiring import open_stomp

RECEIPT_TIMEOUT = 10.0


class NaiveStrategy:
    """Three independent commits: A, B, the broker."""

    name = "naive"
    relay_mode: RelayMode | None = None
    crash_points: tuple[str, ...] = ("after-a-commit", "after-b-commit")

    def __init__(self) -> None:
        self.committed_at: dict[str, float] = {}
        self._crashes = CrashPlan(self.name, self.crash_points)
        self._a: ConnectionPool | None = None
        self._b: ConnectionPool | None = None
        self._targets: frozenset[str] = frozenset()
        self._settings: Settings | None = None
        self._clients: queue.LifoQueue[StompClient] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._opened: list[StompClient] = []

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        from scenarios.outbox.fanout import ensure_queues

        self.close()
        ensure_queues(settings, EVENT_QUEUES)  # a queue created later misses the events before
        self._crashes.arm_from_env()
        self._targets = accounts_of(settings.pg_b, setting="TWOPC_PG_B")
        self._a = ConnectionPool(settings.pg_a, concurrency, setting="TWOPC_PG_A")
        self._b = ConnectionPool(settings.pg_b, concurrency, setting="TWOPC_PG_B")
        self._settings = settings

    def arm_crash(self, point: str, *, every: int = 1, action: CrashAction = "abandon") -> None:
        self._crashes.arm(point, every=every, action=action)

    def run_one(self, transfer: Transfer) -> tuple[Outcome, str]:
        if self._a is None or self._b is None:
            raise RuntimeError("strategy naive: call prepare(settings) before run_one")
        if transfer.target not in self._targets:
            return Outcome.ABORTED, str(MissingAccount(transfer.target, "b"))
        refused = commit_debit(self._a, transfer)
        if refused is not None:
            return Outcome.ABORTED, refused + self._announce_refusal(refused, transfer)
        if self._crashes.hit("after-a-commit"):
            return crashed("after-a-commit")
        return self._credit_and_send(transfer)

    def _credit_and_send(self, transfer: Transfer, *, send: bool = True) -> tuple[Outcome, str]:
        """A has committed: commit B's credit, then send the event (unless ``send`` is off)."""
        assert self._b is not None  # run_one checked prepare() ran
        try:
            with self._b.connection() as conn:
                credited = conn.execute(CREDIT, transfer.credit()).rowcount
                if credited != 1:  # the account was there at prepare: gone since
                    conn.rollback()
                    gone = MissingAccount(transfer.target, "b")
                    return Outcome.IN_DOUBT, f"A committed, B failed: {gone}"
                conn.commit()
        except psycopg.Error as exc:
            return Outcome.IN_DOUBT, f"A committed, B failed: {type(exc).__name__}"
        if self._crashes.hit("after-b-commit"):
            return crashed("after-b-commit")
        try:
            if send:
                self._send(transfer)
        except ParticipantError as exc:
            return Outcome.IN_DOUBT, f"A and B committed, the SEND failed: {exc}"
        self.committed_at[transfer.transfer_id] = time.time()
        return Outcome.COMMITTED, ""

    def _announce_refusal(self, refused: str, transfer: Transfer) -> str:
        """Send ``transfer.refused`` if A refused for lack of funds; what to add to the reason."""
        if refused != INSUFFICIENT_FUNDS:
            return ""
        try:
            self._send(transfer, TRANSFER_REFUSED)
        except ParticipantError as exc:
            return f" ({TRANSFER_REFUSED} not published: {exc})"
        return ""

    def _send(self, transfer: Transfer, kind: str = TRANSFER_COMPLETED) -> None:
        try:
            client = self._clients.get_nowait()
        except queue.Empty:
            assert self._settings is not None  # run_one checked prepare() ran
            client = open_stomp(self._settings)
            with self._lock:
                self._opened.append(client)
        try:
            client.send(
                EVENT_TOPIC,
                transfer.body(),
                transfer.headers(kind),
                receipt_timeout=RECEIPT_TIMEOUT,
            )
        except BaseException:
            client.drop()
            raise
        self._clients.put(client)

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        for pool in (self._a, self._b):
            if pool is not None:
                pool.close()
        self._a = self._b = None
        with self._lock:
            clients, self._opened = self._opened, []
        for client in clients:
            client.close()
        self._clients = queue.LifoQueue()


class NaiveSendFirstStrategy(NaiveStrategy):
    """The naive dual write with the event sent before A's transaction ends: wrong messages.

    In A's transaction: the event is sent (with a receipt: the broker has it),
    then the debit runs, then A commits, then B. A debit refused for lack of
    funds rolls A back after the event went out; so does the crash point
    ``rollback-after-send`` (the transaction rolled back by a failure at commit).
    Either way an event announces a transfer that is in neither A nor B.
    """

    name = "naive-send-first"
    crash_points: tuple[str, ...] = ("rollback-after-send", "after-a-commit", "after-b-commit")

    def __init__(self) -> None:
        super().__init__()
        self._crashes = CrashPlan(self.name, self.crash_points)

    def run_one(self, transfer: Transfer) -> tuple[Outcome, str]:
        if self._a is None or self._b is None:
            raise RuntimeError(f"strategy {self.name}: call prepare(settings) before run_one")
        if transfer.target not in self._targets:
            return Outcome.ABORTED, str(MissingAccount(transfer.target, "b"))
        with self._a.connection() as conn:
            try:
                self._send(transfer)  # the mistake: before the transaction has ended
            except ParticipantError as exc:
                conn.rollback()
                return Outcome.ABORTED, f"the SEND failed before A's debit: {exc}"
            try:
                require_applied(
                    conn.execute(DEBIT_TO, transfer.debit()).rowcount, transfer.source, "a"
                )
            except MissingAccount as exc:
                conn.rollback()
                return Outcome.ABORTED, f"{exc}, after its {TRANSFER_COMPLETED} event was sent"
            except pg_errors.CheckViolation:
                conn.rollback()
                return (
                    Outcome.ABORTED,
                    f"{INSUFFICIENT_FUNDS}, after its {TRANSFER_COMPLETED} event was sent",
                )
            if self._crashes.hit("rollback-after-send"):
                conn.rollback()
                return crashed("rollback-after-send")
            conn.commit()
        if self._crashes.hit("after-a-commit"):
            return crashed("after-a-commit")
        return self._credit_and_send(transfer, send=False)  # the event went out first
