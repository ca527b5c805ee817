"""The naive dual write: commit A, then commit B, then send — with no coordination at all.

The baseline: each step is durable on its own, and a crash (or a failure)
between two steps leaves A, B and the queue disagreeing for good. Nothing
retries and nothing repairs; the anomaly count of the report comes from here.
Wrong input is another matter: a transfer to an account B does not have (its
ids are read at prepare) or from one A does not have is refused before any
commit, so that only crashes and failures make the anomalies.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import psycopg

from coordinator.errors import ParticipantError
from coordinator.states import Outcome
from participants.stomp_client import StompClient
from scenarios.config import Settings
from scenarios.crash_plan import CrashAction, CrashPlan
from scenarios.outbox.relay_modes import RelayMode
from scenarios.strategies.base import (
    ConnectionPool,
    accounts_of,
    commit_debit,
    crashed,
)
from scenarios.transfer.model import (
    CREDIT,
    EVENT_QUEUE,
    TRANSFER_COMPLETED,
    TYPE_HEADER,
    MissingAccount,
    Transfer,
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
        self.close()
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
            return Outcome.ABORTED, refused
        if self._crashes.hit("after-a-commit"):
            return crashed("after-a-commit")
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
            self._send(transfer)
        except ParticipantError as exc:
            return Outcome.IN_DOUBT, f"A and B committed, the SEND failed: {exc}"
        self.committed_at[transfer.transfer_id] = time.time()
        return Outcome.COMMITTED, ""

    def _send(self, transfer: Transfer) -> None:
        try:
            client = self._clients.get_nowait()
        except queue.Empty:
            assert self._settings is not None  # run_one checked prepare() ran
            client = open_stomp(self._settings)
            with self._lock:
                self._opened.append(client)
        try:
            client.send(
                EVENT_QUEUE,
                transfer.body(),
                {"transfer-id": transfer.transfer_id, TYPE_HEADER: TRANSFER_COMPLETED},
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
