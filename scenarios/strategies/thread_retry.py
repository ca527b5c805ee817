"""The second half of the chapter's remedy for ``thread-sync``: work that failed on the caller's
thread is run again, asynchronously, from a record in A.

When B's credit or the announcement fails on the caller's thread, the caller
hears IN_DOUBT with the reason, and a row is committed to A's
``credit_retries`` (transfer, attempts so far, ``next_at``, the last error)
before run_one returns. A :class:`Retrier` thread claims due rows
(``FOR UPDATE SKIP LOCKED``, so any number of processes share them) and runs
the work again, idempotently: B is credited only if it has no ``transfers``
row of that id yet, then the message is sent. Each failure doubles the delay
(:class:`RetryPolicy`); after ``max_attempts`` attempts (the caller's
included) the row is marked ``dead``: the dead letter, kept in A with its
last error, and logged (``thread.retry.dead``).

What a crash does:

* a row is committed before the caller hears, so a process that dies with
  retries waiting leaves them ``pending`` in A; the next ``thread-sync``
  process (its prepare starts a Retrier) finds and runs them
  (``thread.retry.resumed``). Nothing recorded is lost.
* a process that dies in the middle of a retry rolls back its claim (the row
  lock goes with the session): the row stays ``pending`` with the same
  attempt count and is run again; B's check makes the credit happen once,
  the message may be sent twice (at least once).
* work still on the caller's thread (A debited, the first attempt not
  finished, no row yet) is lost with the process, as in any dual write: the
  caller never heard an answer. Only an outbox (the debit and the intent in
  one transaction) closes that window.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from coordinator.errors import ConfigurationError
from coordinator.events import get_logger
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.transfer.model import Transfer

#: Seconds between two looks at the table when nothing is due (rows of other processes).
LOOK_INTERVAL = 0.5

SCHEDULE = (
    "INSERT INTO credit_retries "
    "(transfer_id, source, target, amount, attempts, status, next_at, last_error) "
    "VALUES (%(tid)s, %(source)s, %(target)s, %(amount)s, 1, 'pending', "
    "clock_timestamp() + make_interval(secs => %(delay)s), %(error)s) "
    "ON CONFLICT (transfer_id) DO NOTHING"
)
CLAIM = (
    "SELECT transfer_id, source, target, amount, attempts FROM credit_retries "
    "WHERE status = 'pending' AND next_at <= clock_timestamp() "
    "ORDER BY next_at LIMIT 1 FOR UPDATE SKIP LOCKED"
)
NEXT_DUE = (
    "SELECT extract(epoch FROM min(next_at) - clock_timestamp())::float8 "
    "FROM credit_retries WHERE status = 'pending'"
)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts (the caller's first one included) and the backoff between them."""

    max_attempts: int = 5
    first_delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.first_delay < 0 or self.max_delay < self.first_delay:
            raise ConfigurationError(
                f"retry policy {self}: max_attempts must be >= 1 and 0 <= first_delay <= max_delay"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1: the caller's)."""
        return min(self.first_delay * 2.0 ** (attempt - 1), self.max_delay)


@dataclass
class RetryStats:
    """What this process's retrier did."""

    scheduled: int = 0
    retried: int = 0  # retries that did the work
    retry_failures: int = 0
    dead: int = 0
    resumed: int = 0  # rows found pending at start (left by an earlier process)


class Retrier:
    """Claims due ``credit_retries`` rows in A and runs their work again (``redo``)."""

    def __init__(
        self,
        settings: Settings,
        redo: Callable[[Transfer], None],
        policy: RetryPolicy | None = None,
        *,
        name: str = "thread-sync",
    ) -> None:
        self.settings = settings
        self.redo = redo
        self.policy = policy or RetryPolicy()
        self.stats = RetryStats()
        self.log = get_logger(component="retrier", strategy=name)
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Held while a retry is claimed, done and counted: its row reads 'done' once the
        # database commits, before the count moves (wait_settled waits for both).
        self._claiming = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._thread: threading.Thread | None = None

    # -- the caller's side ------------------------------------------------------------

    def schedule(self, conn: psycopg.Connection, transfer: Transfer, error: str) -> None:
        """Record the failed work in A (committed on return) and wake the retrier."""
        conn.execute(
            SCHEDULE,
            {
                "tid": transfer.transfer_id,
                "source": transfer.source,
                "target": transfer.target,
                "amount": transfer.amount,
                "delay": self.policy.delay(1),
                "error": error,
            },
        )
        conn.commit()
        self.stats.scheduled += 1
        self.log.warning(
            ev.THREAD_RETRY_SCHEDULED,
            transfer_id=transfer.transfer_id,
            error=error,
            max_attempts=self.policy.max_attempts,
        )
        self._wake.set()

    # -- the thread -------------------------------------------------------------------

    def start(self) -> Retrier:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="thread-sync-retrier", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop after the retry in hand; rows still pending stay in A for the next process."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        try:
            self.stats.resumed = self._pending()
            if self.stats.resumed:
                self.log.warning(ev.THREAD_RETRY_RESUMED, pending=self.stats.resumed)
        except psycopg.Error as exc:
            self._lost(exc)
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and self._claim_one():
                    pass
                due = self._next_due()
            except psycopg.Error as exc:
                self._lost(exc)
                due = None
            wait = LOOK_INTERVAL if due is None else min(max(due, 0.0), LOOK_INTERVAL)
            self._wake.wait(wait)
            self._wake.clear()

    def _lost(self, exc: psycopg.Error) -> None:
        hint = (
            "; run 'twopc transfer --reset' to create credit_retries"
            if isinstance(exc, psycopg.errors.UndefinedTable)
            else ""
        )
        self.log.warning(ev.THREAD_RETRY_DATABASE_LOST, error=f"{str(exc).strip()}{hint}")
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._stop.wait(LOOK_INTERVAL)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.settings.pg_a, autocommit=True, application_name="twopc thread-sync retrier"
            )
        return self._conn

    def _next_due(self) -> float | None:
        row = self._connection().execute(NEXT_DUE).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def _claim_one(self) -> bool:
        """Run one due retry; False when none is due."""
        with self._claiming:
            return self._claim_and_count()

    def _claim_and_count(self) -> bool:
        conn = self._connection()
        with conn.transaction():
            row = conn.execute(CLAIM).fetchone()
            if row is None:
                return False
            tid, source, target, amount, attempts = row
            attempt = attempts + 1
            try:
                self.redo(Transfer(tid, source, target, int(amount)))
            except Exception as exc:  # any failure of the work is an attempt: retried, then dead
                self._failed(conn, tid, attempt, f"{type(exc).__name__}: {exc}")
                return True
            conn.execute(
                "UPDATE credit_retries SET status = 'done', attempts = %s, "
                "updated_at = clock_timestamp() WHERE transfer_id = %s",
                (attempt, tid),
            )
        self.stats.retried += 1
        self.log.info(ev.THREAD_RETRY_DONE, transfer_id=tid, attempt=attempt)
        return True

    def _failed(self, conn: psycopg.Connection, tid: str, attempt: int, error: str) -> None:
        error = " ".join(error.split())
        if attempt >= self.policy.max_attempts:
            conn.execute(
                "UPDATE credit_retries SET status = 'dead', attempts = %s, last_error = %s, "
                "updated_at = clock_timestamp() WHERE transfer_id = %s",
                (attempt, error, tid),
            )
            self.stats.dead += 1
            self.log.error(ev.THREAD_RETRY_DEAD, transfer_id=tid, attempts=attempt, error=error)
            return
        conn.execute(
            "UPDATE credit_retries SET attempts = %s, last_error = %s, "
            "next_at = clock_timestamp() + make_interval(secs => %s), "
            "updated_at = clock_timestamp() WHERE transfer_id = %s",
            (attempt, error, self.policy.delay(attempt), tid),
        )
        self.stats.retry_failures += 1
        self.log.warning(ev.THREAD_RETRY_FAILED, transfer_id=tid, attempt=attempt, error=error)

    # -- watching ---------------------------------------------------------------------

    def _pending(self) -> int:
        """Rows of credit_retries still waiting for a retry (any process's)."""
        row = (
            self._connection()
            .execute("SELECT count(*) FROM credit_retries WHERE status = 'pending'")
            .fetchone()
        )
        return int(row[0]) if row else 0

    def wait_settled(self, timeout: float) -> int:
        """Wait until no row is pending (each done or dead); the rows still pending."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.settings.pg_a, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM credit_retries WHERE status = 'pending'"
                ).fetchone()
                left = int(row[0]) if row else 0
                if not left:
                    with self._claiming:  # the last retry's count, after its commit
                        return 0
                if time.monotonic() >= deadline:
                    return left
                self._wake.set()
                time.sleep(0.05)

    def as_dict(self) -> dict[str, Any]:
        return {
            "retries_scheduled": self.stats.scheduled,
            "retried": self.stats.retried,
            "retry_failures": self.stats.retry_failures,
            "dead_letters": self.stats.dead,
            "retries_resumed": self.stats.resumed,
        }


@dataclass(frozen=True)
class RetryRecord:
    """One row of A's credit_retries."""

    transfer_id: str
    status: str
    attempts: int
    last_error: str
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_retries(dsn: str, *, status: str | None = None) -> list[RetryRecord]:
    """The rows of A's credit_retries (of one ``status``, or all), oldest first."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT transfer_id, status, attempts, last_error, updated_at::text "
            "FROM credit_retries WHERE %(status)s::text IS NULL OR status = %(status)s "
            "ORDER BY created_at",
            {"status": status},
        ).fetchall()
    return [RetryRecord(*row) for row in rows]
