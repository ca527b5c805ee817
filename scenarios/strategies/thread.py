"""Fire-and-forget on a thread pool, and the chapter's remedy: the same work on the caller's thread.

``thread``: A's local commit (the debit), then B's credit and the announcement
are submitted to a bounded ``ThreadPoolExecutor`` and the caller is told
"committed" at once. What the chapter warns about shows here:

* an exception in the pool never reaches the caller: it is logged
  (``thread.task.failed``) and counted (``stats()['unseen_errors']``), and the
  transfer stays debited in A only, an atomicity violation the checker reports;
* work still queued when the process dies is gone: nothing recorded it. The
  crash point ``process-dies-with-queue`` kills the process (``kill``) or drops
  the queue as a death would (``abandon``) while work waits in it.

``thread-sync``: the same steps, run on the caller's thread before run_one
returns, so a failure of the credit or the send is the caller's outcome
(IN_DOUBT, with the reason) instead of a log line nobody reads; and, the
remedy's second half, the failed work is recorded in A and run again
asynchronously, with backoff, until done or dead-lettered
(scenarios.strategies.thread_retry, which says what a crash does to it).

Crash points: ``credit-fails`` makes the credit raise (in the pool, or on the
caller's thread for ``thread-sync``); ``process-dies-with-queue`` (``thread``
only) is hit after a submit that left work queued.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg

from coordinator.errors import ParticipantError, TwoPhaseCommitError
from coordinator.events import get_logger
from coordinator.states import Outcome
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.crash_plan import CrashPlan
from scenarios.strategies.base import commit_debit, crashed
from scenarios.strategies.naive import NaiveStrategy
from scenarios.strategies.thread_retry import Retrier, RetryPolicy
from scenarios.transfer.model import CREDIT, MissingAccount, Transfer

#: Threads of the pool, and how much work may wait for one before submit blocks.
POOL_THREADS = 4
POOL_QUEUE = 64
#: thread-sync's retrier's crash points: ``retry-scheduled`` is passed once a retry is
#: recorded in A (``kill`` there leaves it pending for the next process), ``retry-fails``
#: makes a retry's work raise.
RETRY_CRASH_POINTS = ("retry-scheduled", "retry-fails")


class CreditFailed(TwoPhaseCommitError):
    """B refused or lost the credit of a transfer whose debit A already committed."""


class _Work:
    """B's credit and the announcement of one transfer: what the pool (or the caller) runs."""

    def __init__(self, strategy: ThreadStrategy, transfer: Transfer) -> None:
        self.strategy = strategy
        self.transfer = transfer

    def __call__(self) -> None:
        strategy, transfer = self.strategy, self.transfer
        if strategy._crashes.hit("credit-fails"):
            raise CreditFailed(f"credit of {transfer.transfer_id} failed (injected)")
        assert strategy._b is not None  # prepare() ran before run_one submitted this
        with strategy._b.connection() as conn:
            credited = conn.execute(CREDIT, transfer.credit()).rowcount
            if credited != 1:
                conn.rollback()
                raise CreditFailed(str(MissingAccount(transfer.target, "b")))
            conn.commit()
        strategy._send(transfer)
        strategy.converged_at[transfer.transfer_id] = time.time()


class ThreadStrategy(NaiveStrategy):
    """Commit A, hand B's credit and the send to a bounded pool, answer "committed"."""

    name = "thread"
    crash_points: tuple[str, ...] = ("credit-fails", "process-dies-with-queue")
    synchronous = False

    def __init__(self) -> None:
        super().__init__()
        #: transfer id -> time.time() when B's credit and the send were done.
        self.converged_at: dict[str, float] = {}
        self.unseen_errors = 0
        self.dropped = 0
        self.log = get_logger(component="strategy", strategy=self.name)
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(POOL_THREADS + POOL_QUEUE)
        self._queued = 0
        self._count_lock = threading.Lock()
        self._futures: set[Future[None]] = set()

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        super().prepare(settings, concurrency=concurrency)
        if not self.synchronous:
            self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix=f"{self.name}-pool")

    def run_one(self, transfer: Transfer) -> tuple[Outcome, str]:
        if self._a is None or self._b is None:
            raise RuntimeError(f"strategy {self.name}: call prepare(settings) before run_one")
        if transfer.target not in self._targets:
            return Outcome.ABORTED, str(MissingAccount(transfer.target, "b"))
        refused = commit_debit(self._a, transfer)
        if refused is not None:
            return Outcome.ABORTED, refused
        work = _Work(self, transfer)
        if self.synchronous:
            return self._run_here(work)
        self._submit(work)
        self.committed_at[transfer.transfer_id] = time.time()
        if self._queued > 0 and self._crashes.hit("process-dies-with-queue"):
            self._drop_queue()  # abandon: the process died; kill never gets here
            return crashed("process-dies-with-queue")
        return Outcome.COMMITTED, ""

    def _run_here(self, work: _Work) -> tuple[Outcome, str]:
        """thread-sync: the failure is the caller's outcome."""
        try:
            work()
        except (CreditFailed, ParticipantError, psycopg.Error) as exc:
            return Outcome.IN_DOUBT, f"A committed, {type(exc).__name__}: {exc}"
        self.committed_at[work.transfer.transfer_id] = time.time()
        return Outcome.COMMITTED, ""

    def _submit(self, work: _Work) -> None:
        assert self._pool is not None  # prepare() made it
        self._slots.acquire()  # bounded: the caller waits when the queue is full
        with self._count_lock:
            self._queued += 1

        def run() -> None:
            with self._count_lock:
                self._queued -= 1
            try:
                work()
            except Exception as exc:  # fire and forget: nobody is waiting for this
                with self._count_lock:
                    self.unseen_errors += 1
                self.log.error(
                    ev.THREAD_TASK_FAILED,
                    transfer_id=work.transfer.transfer_id,
                    error=f"{type(exc).__name__}: {exc}",
                )
            finally:
                self._slots.release()

        future = self._pool.submit(run)
        with self._count_lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future[None]) -> None:
        with self._count_lock:
            self._futures.discard(future)
            if future.cancelled():
                self._queued -= 1
                self.dropped += 1
                self._slots.release()

    def _drop_queue(self) -> None:
        """What a process death does to the pool: the queued work is never run."""
        with self._count_lock:
            futures = list(self._futures)
        dropped = sum(1 for future in futures if future.cancel())
        self.log.warning(ev.THREAD_WORK_DROPPED, transfers=dropped)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until the pool has run (or dropped) everything submitted so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._count_lock:
                if not self._futures:
                    return
            time.sleep(0.01)

    def stats(self) -> dict[str, Any]:
        if self.synchronous:
            return {}
        return {"unseen_errors": self.unseen_errors, "work_dropped": self.dropped}

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # a clean exit runs what is queued
        super().close()


class ThreadSyncStrategy(ThreadStrategy):
    """The remedy: the pool's work on the caller's thread, its failure the caller's outcome,
    and the failed work run again asynchronously (scenarios.strategies.thread_retry)."""

    name = "thread-sync"
    crash_points: tuple[str, ...] = ("credit-fails",)
    synchronous = True

    def __init__(self) -> None:
        super().__init__()
        # The retrier's crash points: armed like the writer's, not part of the report's list.
        self._crashes = CrashPlan(self.name, (*self.crash_points, *RETRY_CRASH_POINTS))
        self.retry_policy = RetryPolicy()
        self._retrier: Retrier | None = None
        self._retried: dict[str, Any] = {}

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        super().prepare(settings, concurrency=concurrency)
        self._retrier = Retrier(settings, self._redo, self.retry_policy, name=self.name).start()

    def _run_here(self, work: _Work) -> tuple[Outcome, str]:
        """The failure is the caller's outcome, and a retry is recorded in A before it hears."""
        try:
            work()
        except (CreditFailed, ParticipantError, psycopg.Error) as exc:
            error = f"{type(exc).__name__}: {exc}"
            return Outcome.IN_DOUBT, f"A committed, {error}; {self._schedule(work.transfer, error)}"
        self.committed_at[work.transfer.transfer_id] = time.time()
        return Outcome.COMMITTED, ""

    def _schedule(self, transfer: Transfer, error: str) -> str:
        """Record the retry; what the caller is told about it."""
        assert self._a is not None and self._retrier is not None  # prepare() ran
        try:
            with self._a.connection() as conn:
                self._retrier.schedule(conn, transfer, error)
        except (ParticipantError, psycopg.Error) as exc:
            return f"no retry recorded ({type(exc).__name__}: {exc}): reconcile it by hand"
        if self._crashes.hit("retry-scheduled"):
            return "retry scheduled, then the process died (crash injected)"
        attempts = self.retry_policy.max_attempts
        return f"retry scheduled in A's credit_retries ({attempts} attempts in all)"

    def _redo(self, transfer: Transfer) -> None:
        """The retry's work: credit B unless it already holds the transfer, then send."""
        if self._crashes.hit("retry-fails"):
            raise CreditFailed(f"retry of {transfer.transfer_id} failed (injected)")
        assert self._b is not None  # the retrier runs between prepare() and close()
        with self._b.connection() as conn:
            known = conn.execute(
                "SELECT 1 FROM transfers WHERE transfer_id = %s", (transfer.transfer_id,)
            ).fetchone()
            if known is None:
                credited = conn.execute(CREDIT, transfer.credit()).rowcount
                if credited != 1:
                    conn.rollback()
                    raise CreditFailed(str(MissingAccount(transfer.target, "b")))
            conn.commit()
        self._send(transfer)
        self.converged_at[transfer.transfer_id] = time.time()

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every recorded retry is done or dead (or ``timeout``)."""
        if self._retrier is not None:
            self._retrier.wait_settled(timeout)

    def stats(self) -> dict[str, Any]:
        """The retrier's counts (those of the last one, after close)."""
        return self._retrier.as_dict() if self._retrier is not None else self._retried

    def close(self) -> None:
        retrier, self._retrier = self._retrier, None
        if retrier is not None:
            retrier.stop()  # what is still pending stays in A for the next process
            self._retried = retrier.as_dict()
        super().close()
