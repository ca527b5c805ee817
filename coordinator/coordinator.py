"""The coordinator: owns the participants, the decision log and the threads; runs transactions."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from coordinator import driver, events, failpoints
from coordinator.errors import CrashInjected, DuplicateGtrid, TwoPhaseCommitError
from coordinator.log import DecisionLog
from coordinator.protocol import LastResource, XAResource
from coordinator.states import TERMINAL, Outcome, TxState
from coordinator.transaction import Transaction
from coordinator.xid import Xid, gtrid_prefix, new_gtrid, validate_coordinator_id, validate_id


class Coordinator:
    """Runs global transactions over XA resources and at most one last resource (a broker).

    One coordinator per decision log. On start it runs recovery (unless told not
    to), so that what a crashed predecessor left prepared is resolved first.
    """

    def __init__(
        self,
        coordinator_id: str,
        log: DecisionLog,
        resources: Sequence[XAResource],
        broker: LastResource | None = None,
        *,
        timeout: float = 30.0,
        receipt_timeout: float = 5.0,
        max_workers: int = 32,
        recover_on_start: bool = True,
        marker_batch: int = 500,
        housekeeping_interval: float | None = 1.0,
    ) -> None:
        self.coordinator_id = validate_coordinator_id(coordinator_id)
        self.prefix = gtrid_prefix(coordinator_id)
        self.log = log
        self.resources: dict[str, XAResource] = {}
        for resource in resources:
            validate_id("participant name", resource.name)
            if resource.name in self.resources:
                raise TwoPhaseCommitError(f"two participants are named {resource.name!r}")
            self.resources[resource.name] = resource
        self.broker = broker
        self.timeout = timeout
        self.marker_batch = marker_batch
        # Seconds between the watchdog's retries of deferred phase 2s, missed rollbacks
        # and in-doubt transactions; None leaves them to explicit calls (tests do).
        self.housekeeping_interval = housekeeping_interval
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="twopc-phase"
        )
        self.config = driver.DriverConfig(
            log=log,
            executor=self._executor,
            failpoint=self.failpoint,
            receipt_timeout=receipt_timeout,
            defer=self._defer,
        )
        self._deferred: list[Transaction] = []  # committed; phase 2 to finish later
        self._in_doubt: list[Transaction] = []  # the broker's COMMIT got no answer
        self._unrolled: list[tuple[str, Xid]] = []  # aborted branches a rollback missed
        self._active: dict[str, Transaction] = {}
        self._lock = threading.Lock()
        self._ended_with_marker: list[str] = []
        self.outcomes: Counter[Outcome] = Counter()
        self.messages: Counter[str] = Counter()  # "business" / "marker", committed only
        self._closed = threading.Event()
        self._finishing = 0  # commit or rollback sequences running now (guarded by _lock)
        self._none_finishing = threading.Condition(self._lock)
        self._watchdog = threading.Thread(
            target=self._watch_timeouts, name="twopc-watchdog", daemon=True
        )
        self._watchdog.start()
        self.last_recovery: Any = None
        if recover_on_start:
            try:
                self.recover()
            except BaseException:
                self._closed.set()  # no thread outlives a coordinator that failed to start
                self._executor.shutdown(wait=False)
                raise

    # -- transactions ---------------------------------------------------------

    @contextmanager
    def transaction(
        self, gtrid: str | None = None, *, timeout: float | None = None
    ) -> Iterator[Transaction]:
        """A new global transaction; commits when the block ends (see Transaction)."""
        tx = self.begin(gtrid, timeout=timeout)
        with tx:
            yield tx

    def begin(self, gtrid: str | None = None, *, timeout: float | None = None) -> Transaction:
        """Start a global transaction; ``gtrid`` must carry this coordinator's prefix."""
        if self._closed.is_set():
            raise TwoPhaseCommitError("the coordinator is closed")
        if gtrid is None:
            gtrid = new_gtrid(self.coordinator_id)
        else:
            validate_id("gtrid", gtrid)
            if not gtrid.startswith(self.prefix):
                raise TwoPhaseCommitError(
                    f"gtrid {gtrid!r} must start with {self.prefix!r} so that this "
                    "coordinator's recovery can find it"
                )
        tx = Transaction(self, gtrid, self.timeout if timeout is None else timeout)
        with self._lock:
            in_doubt = {t.gtrid for t in self._in_doubt}
            marked = set(self._ended_with_marker) | in_doubt
            if gtrid in self._active or gtrid in marked or gtrid in self.log.pending():
                raise DuplicateGtrid(
                    f"gtrid {gtrid} is already in use by a transaction of this coordinator"
                )
            self._active[gtrid] = tx
        return tx

    def finish(self, tx: Transaction, *, commit: bool) -> Outcome:
        """Run the commit (or rollback) sequence; called by Transaction.commit/rollback.

        After close() has begun, a transaction that was still open is rolled
        back instead of committed (its reason says so): its decision could no
        longer be logged.
        """
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._finishing += 1
        if closed and commit:
            commit = False
            tx.reason = "the coordinator was closed before this transaction committed"
        try:
            return self._finish(tx, commit=commit)
        finally:
            if not closed:
                with self._lock:
                    self._finishing -= 1
                    self._none_finishing.notify_all()

    def _finish(self, tx: Transaction, *, commit: bool) -> Outcome:
        try:
            if commit:
                outcome = driver.commit(tx, self.config)
            else:
                outcome = driver.abort(tx, self.config, tx.reason)
        except CrashInjected:
            raise  # a simulated death: no clean-up, exactly like a real one
        except Exception as exc:
            if tx.state in (TxState.ACTIVE, TxState.PREPARING):
                outcome = driver.abort(tx, self.config, f"{type(exc).__name__}: {exc}")
            elif tx.state is TxState.COMMITTING:
                tx.move(TxState.IN_DOUBT)
                tx.reason = f"{type(exc).__name__} at the commit point: {exc}"
                outcome = Outcome.IN_DOUBT
            else:
                self._forget(tx)
                raise
        tx.outcome = outcome
        self.outcomes[outcome] += 1
        if outcome is Outcome.IN_DOUBT and tx.broker is not None and tx.branches:
            with self._lock:
                self._in_doubt.append(tx)
        if outcome is Outcome.ABORTED:
            missed = [(n, b.xid) for n, b in tx.branches.items() if getattr(b, "left_prepared", 0)]
            with self._lock:
                self._unrolled.extend(missed)
        if outcome is Outcome.COMMITTED:
            self.messages["business"] += tx.messages_sent
            self.messages["marker"] += tx.marker_sent
        self._forget(tx)
        return outcome

    def _forget(self, tx: Transaction) -> None:
        for branch in tx.branches.values():
            branch.release()
        if tx.broker is not None:
            tx.broker.release()
        with self._lock:
            self._active.pop(tx.gtrid, None)
            if tx.state is TxState.COMPLETED and tx.marker_sent:
                self._ended_with_marker.append(tx.gtrid)
                sweep = len(self._ended_with_marker) >= self.marker_batch
            else:
                sweep = False
        if sweep and not self._closed.is_set():  # close() sweeps what is left
            self._executor.submit(self.sweep_markers)

    def failpoint(self, name: str) -> None:
        failpoints.hit(name)

    # -- housekeeping -----------------------------------------------------------

    def sweep_markers(self) -> int:
        """Remove the commit markers of transactions that ended (in batches)."""
        if self.broker is None:
            return 0
        with self._lock:
            batch, self._ended_with_marker = self._ended_with_marker, []
        if not batch:
            return 0
        self.log.flush()  # the END records first: a marker may go only once END is durable
        try:
            removed = self.broker.remove_markers(batch)
        except TwoPhaseCommitError as exc:
            events.get_logger().warning(events.MARKERS_REMOVED, error=str(exc))
            with self._lock:
                self._ended_with_marker.extend(batch)
            return 0
        events.get_logger().debug(events.MARKERS_REMOVED, count=removed)
        return removed

    def _watch_timeouts(self) -> None:
        """Cancel the statements of transactions that outlive their deadline; every
        ``housekeeping_interval``, finish deferred phase 2s and resolve in-doubt ones."""
        last_chores = time.monotonic()
        while not self._closed.wait(0.2):
            now = time.monotonic()
            with self._lock:
                late = [
                    tx
                    for tx in self._active.values()
                    if tx.state is TxState.ACTIVE and now > tx.deadline and not tx.timed_out
                ]
            for tx in late:
                tx.timed_out = True
                tx.log.warning(events.TIMEOUT, seconds=round(now - tx.started, 3))
                with tx.lock:
                    branches = list(tx.branches.values())
                for branch in branches:
                    cancel = getattr(branch, "cancel", None)
                    if cancel is not None:
                        cancel()
            interval = self.housekeeping_interval
            if interval is not None and now - last_chores >= interval:
                last_chores = now
                self.retry_deferred()
                self.retry_rollbacks()
                self.resolve_in_doubt()

    def _defer(self, tx: Transaction) -> None:
        with self._lock:
            self._deferred.append(tx)

    def retry_deferred(self) -> int:
        """Finish phase 2 of committed transactions whose participants failed; return count."""
        with self._lock:
            pending, self._deferred = self._deferred, []
        done = 0
        for tx in pending:
            try:
                for name, branch in tx.branches.items():
                    self.resources[name].commit_recovered(branch.xid)
            except TwoPhaseCommitError:
                self._defer(tx)
                continue
            self.log.log_end(tx.gtrid)
            tx.move(TxState.COMPLETED)
            if tx.marker_sent:
                with self._lock:
                    self._ended_with_marker.append(tx.gtrid)
            done += 1
        return done

    def retry_rollbacks(self) -> int:
        """Roll back, by xid, prepared branches of aborted transactions whose session died."""
        with self._lock:
            pending, self._unrolled = self._unrolled, []
        done = 0
        for name, xid in pending:
            try:
                self.resources[name].rollback_recovered(xid)
            except TwoPhaseCommitError:
                with self._lock:
                    self._unrolled.append((name, xid))
                continue
            done += 1
        return done

    def resolve_in_doubt(self, timeout: float = 10.0) -> int:
        """Decide transactions whose broker COMMIT got no answer, by their marker.

        The session is fenced first (its client-id re-registered), so its COMMIT
        has been processed or discarded and the marker queue is final for it.
        Transactions that cannot be decided yet stay for the next attempt.
        """
        with self._lock:
            pending, self._in_doubt = self._in_doubt, []
        if not pending or self.broker is None:
            return 0
        resolved = 0
        try:
            for tx in pending:
                assert tx.broker is not None
                self.broker.settle(tx.broker, timeout)
            markers = self.broker.markers()
        except TwoPhaseCommitError as exc:
            events.get_logger().warning(events.RECOVERY_RESOLVED, error=str(exc))
            with self._lock:
                self._in_doubt.extend(pending)
            return 0
        for tx in pending:
            try:
                self._resolve_one(tx, committed=tx.gtrid in markers)
            except TwoPhaseCommitError as exc:
                tx.log.warning(events.RECOVERY_RESOLVED, error=str(exc))
                with self._lock:
                    self._in_doubt.append(tx)
                continue
            resolved += 1
        return resolved

    def _resolve_one(self, tx: Transaction, *, committed: bool) -> None:
        if committed:
            self.log.log_commit(tx.gtrid, list(tx.branches), force=True)
            tx.move(TxState.COMMITTED)
            for name, branch in tx.branches.items():
                self.resources[name].commit_recovered(branch.xid)
            self.log.log_end(tx.gtrid)
            tx.move(TxState.COMPLETED)
            with self._lock:
                self._ended_with_marker.append(tx.gtrid)
        else:
            tx.move(TxState.ABORTING)
            for name, branch in tx.branches.items():
                self.resources[name].rollback_recovered(branch.xid)
            tx.move(TxState.ABORTED)
        tx.log.info(events.RECOVERY_RESOLVED, decision="commit" if committed else "rollback")

    @property
    def in_doubt(self) -> list[str]:
        """Gtrids this coordinator still has to resolve."""
        with self._lock:
            return [tx.gtrid for tx in self._in_doubt]

    # -- recovery -------------------------------------------------------------

    def recover(self, *, fence_timeout: float = 30.0) -> Any:
        """Resolve what is in doubt (see coordinator.recovery); return the report."""
        from coordinator.recovery import Recovery

        if self.active:
            # A prepared branch of a running transaction would look in doubt and be
            # rolled back under its feet: recovery runs only while nothing is in flight.
            raise TwoPhaseCommitError(
                f"recovery needs the coordinator idle; {len(self.active)} transactions are running"
            )
        with self._lock:  # a full pass fences and decides these too
            self._in_doubt.clear()
        report = Recovery(
            self.coordinator_id, self.log, list(self.resources.values()), self.broker
        ).run(fence_timeout=fence_timeout)
        self.last_recovery = report
        return report

    # -- stats and shutdown ---------------------------------------------------

    def stats(self) -> Mapping[str, Any]:
        """Counters for reports: outcomes, forced log writes, committed messages."""
        committed = self.outcomes[Outcome.COMMITTED]
        return {
            "committed": committed,
            "aborted": self.outcomes[Outcome.ABORTED],
            "in_doubt": self.outcomes[Outcome.IN_DOUBT],
            "forced_log_writes": self.log.forced_writes,
            "forced_log_writes_per_commit": (
                self.log.forced_writes / committed if committed else 0.0
            ),
            "business_messages": self.messages["business"],
            "marker_messages": self.messages["marker"],
        }

    @property
    def active(self) -> list[str]:
        with self._lock:
            return [g for g, tx in self._active.items() if tx.state not in TERMINAL]

    def close(self) -> None:
        """Finish housekeeping and release connections, threads and the log's lock.

        Commits already running finish first (up to ``timeout`` seconds); a
        transaction still open is rolled back when its owner ends it.
        """
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._none_finishing.wait_for(lambda: self._finishing == 0, timeout=self.timeout)
        self._watchdog.join()
        self.retry_deferred()
        self.retry_rollbacks()
        self.resolve_in_doubt()
        self.sweep_markers()
        self.log.flush()
        self._executor.shutdown(wait=True)
        for resource in self.resources.values():
            resource.close()
        if self.broker is not None:
            self.broker.close()
        self.log.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
