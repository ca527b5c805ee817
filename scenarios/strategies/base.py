"""What every transfer strategy shares: the Strategy protocol, a connection pool, injected crashes.

A strategy makes one transfer (debit in A, credit in B, one message: a
``transfer.completed`` event on the events' virtual topic, or a credit command on
/queue/transfers.credit) with its own guarantee. Its life cycle::

    strategy = new_strategy("outbox-status")   # scenarios.strategies
    strategy.prepare(settings, concurrency=16)  # opens what run_one needs
    outcome, reason = strategy.run_one(transfer)  # from any number of threads
    strategy.close()

``run_one`` returns when the client's work is done: for 2PC and the naive
dual write B is credited by then; for the outbox and CDC strategies
(``relay_mode`` set) B is credited later, by a relay and the consumer (see
scenarios.outbox.pipeline). ``committed_at`` holds the wall-clock time
(``time.time()``) at which each committed transfer's client commit returned,
the start of its convergence latency.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import psycopg
from psycopg import errors as pg_errors

from coordinator.errors import ConfigurationError, ParticipantUnavailable
from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.crash_plan import CrashAction
from scenarios.outbox.relay_modes import RelayMode
from scenarios.transfer.model import (
    DEBIT_TO,
    MissingAccount,
    Transfer,
    account_ids,
    require_applied,
)


class Strategy(Protocol):
    """One way to make the transfer; see the module docstring for the life cycle."""

    #: The registry name ("2pc", "outbox-status", "outbox-last-id", "cdc", "naive").
    name: str
    #: The relay B's credit depends on, or None when run_one credits B itself.
    relay_mode: RelayMode | None
    #: Where arm_crash can make the writer die, in the order run_one passes them.
    crash_points: tuple[str, ...]
    #: transfer id -> time.time() when its client commit returned (committed only).
    committed_at: dict[str, float]

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        """Open connections for ``concurrency`` concurrent run_one calls."""

    def run_one(self, transfer: Transfer) -> tuple[Outcome, str]:
        """Make one transfer; (COMMITTED, ""), (ABORTED, why) or (IN_DOUBT, why).

        IN_DOUBT is also what an injected crash returns: the client never heard.
        """
        ...

    def arm_crash(self, point: str, *, every: int = 1, action: CrashAction = "abandon") -> None:
        """Crash the writer at ``point`` (one of crash_points).

        ``abandon``: every ``every``-th transfer stops at the point as if its process
        died there (open transactions roll back, later steps never run) and run_one
        returns IN_DOUBT. ``kill``: the ``every``-th hit SIGKILLs this process.
        """

    def stats(self) -> dict[str, Any]:
        """Figures to print beside the batch's, by name (2PC: its coordinator's counters)."""
        ...

    def close(self) -> None:
        """Release everything prepare opened (idempotent)."""


#: The abort reason of a transfer A refused for lack of funds.
INSUFFICIENT_FUNDS = "insufficient funds in A"


def commit_debit(pool: ConnectionPool, transfer: Transfer) -> str | None:
    """Debit A in its own local transaction and commit; the reason it was refused, or None.

    The first step of the strategies without a global transaction (naive, thread): a
    missing account or insufficient funds rolls back and is the transfer's abort reason.
    """
    with pool.connection() as conn:
        try:
            require_applied(conn.execute(DEBIT_TO, transfer.debit()).rowcount, transfer.source, "a")
        except MissingAccount as exc:
            conn.rollback()
            return str(exc)
        except pg_errors.CheckViolation:
            conn.rollback()
            return INSUFFICIENT_FUNDS
        conn.commit()
    return None


def crashed(point: str) -> tuple[Outcome, str]:
    """What run_one returns for a transfer whose writer was made to die at ``point``."""
    return Outcome.IN_DOUBT, f"crash injected at {point}"


# -- connections ---------------------------------------------------------------------


class ConnectionPool:
    """A fixed number of psycopg connections to one database, shared by writer threads."""

    def __init__(self, dsn: str, size: int, *, setting: str) -> None:
        self.dsn = dsn
        self.setting = setting
        self._free: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max(size, 1))
        self._all: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A connection with no transaction open; one that broke is replaced next time."""
        self._slots.acquire()
        try:
            try:
                conn = self._free.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield conn
            except BaseException:
                self._discard(conn)
                raise
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._discard(conn)
            else:
                self._free.put(conn)
        finally:
            self._slots.release()

    def _connect(self) -> psycopg.Connection:
        if self._closed:
            raise ConfigurationError("the connection pool is closed")
        try:
            conn = psycopg.connect(self.dsn)
        except psycopg.OperationalError as exc:
            raise ParticipantUnavailable(
                f"cannot connect to {self.setting}: {exc}; run 'twopc lab up' or check "
                f"{self.setting}",
                participant=self.setting,
            ) from None
        with self._lock:
            self._all.append(conn)
        return conn

    def _discard(self, conn: psycopg.Connection) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def accounts_of(dsn: str, *, setting: str) -> frozenset[str]:
    """The account ids of one database, read once; an unreachable one names ``setting``."""
    pool = ConnectionPool(dsn, 1, setting=setting)
    try:
        with pool.connection() as conn:
            ids = account_ids(conn)
            conn.rollback()
        return ids
    finally:
        pool.close()
