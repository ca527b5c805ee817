"""The coordinator: owns the participants, the decision log and the threads; runs transactions.

The walk of one gtrid: :meth:`Coordinator.begin` makes a
:class:`~coordinator.transaction.Transaction`; its work runs on the
participants' branches; :meth:`Coordinator.finish` hands it to the commit
sequence (:mod:`coordinator.driver`); whatever that could not finish goes to
the :class:`~coordinator.recovery.Backlog`, and a crash leaves it to
:class:`~coordinator.recovery.Recovery` at the next start.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from coordinator import driver, events, failpoints
from coordinator.errors import (
    ConfigurationError,
    CrashInjected,
    DuplicateGtrid,
    InvalidTransition,
    InvalidXid,
)
from coordinator.log import DecisionLog
from coordinator.peers import Membership, PeerRecovery, recover_dead
from coordinator.protocol import AsyncXAResource, LastResource, XAResource
from coordinator.recovery import Backlog, Recovery, RecoveryReport
from coordinator.states import TERMINAL, Outcome, TxState
from coordinator.transaction import Transaction
from coordinator.xid import gtrid_prefix, new_gtrid, validate_coordinator_id, validate_id

R = TypeVar("R", XAResource, AsyncXAResource)


def by_name(resources: Sequence[R]) -> dict[str, R]:
    """The participants by name; ConfigurationError for a bad or repeated name."""
    named: dict[str, R] = {}
    for resource in resources:
        validate_id("participant name", resource.name)
        if resource.name in named:
            raise ConfigurationError(f"two participants are named {resource.name!r}")
        named[resource.name] = resource
    return named


def stats_of(
    outcomes: Counter[Outcome], messages: Counter[str], forced_writes: int
) -> dict[str, Any]:
    """A coordinator's counters for reports (sync and asyncio alike): outcomes, forced
    log writes, committed messages."""
    committed = outcomes[Outcome.COMMITTED]
    return {
        "committed": committed,
        "aborted": outcomes[Outcome.ABORTED],
        "in_doubt": outcomes[Outcome.IN_DOUBT],
        "heuristic_mixed": outcomes[Outcome.HEURISTIC_MIXED],
        "forced_log_writes": forced_writes,
        "forced_log_writes_per_commit": forced_writes / committed if committed else 0.0,
        "business_messages": messages["business"],
        "marker_messages": messages["marker"],
    }


def released(step: Callable[[], object], what: str) -> None:
    """One step of releasing a coordinator (its close, or a start that failed): a failure
    is logged, never raised, so that every later step still runs."""
    try:
        step()
    except Exception as exc:
        events.get_logger().warning(
            events.RELEASE_FAILED, what=what, error=f"{type(exc).__name__}: {exc}"
        )


def gtrid_for(coordinator_id: str, gtrid: str | None) -> str:
    """A new gtrid, or ``gtrid`` checked to carry the coordinator's prefix (InvalidXid)."""
    if gtrid is None:
        return new_gtrid(coordinator_id)
    validate_id("gtrid", gtrid)
    prefix = gtrid_prefix(coordinator_id)
    if not gtrid.startswith(prefix):
        raise InvalidXid(
            f"gtrid {gtrid!r} must start with {prefix!r} so that this "
            "coordinator's recovery can find it"
        )
    return gtrid


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
        membership: Membership | None = None,
        peer_broker: Callable[[str], LastResource | None] | None = None,
        peer_interval: float | None = 5.0,
    ) -> None:
        self.log = log
        self._broker = broker
        try:
            self.coordinator_id = validate_coordinator_id(coordinator_id)
            self.prefix = gtrid_prefix(coordinator_id)
            self._resources: dict[str, XAResource] = by_name(resources)
        except BaseException:
            self._resources = {r.name: r for r in resources}
            self._release_all()  # the coordinator owns what it was given, even when refused
            raise
        # Many coordinators (docs/design.md §4): this one's liveness lock, the broker of a dead
        # peer by its id (for fencing and its markers), and how often to look for one.
        self.membership = membership
        self._peer_broker = peer_broker or (lambda peer: None)
        self.peer_interval = peer_interval
        self.peer_recoveries: list[PeerRecovery] = []  # the latest ones, newest last
        self.timeout = timeout
        # Seconds between the watchdog's retries of deferred phase 2s, missed rollbacks
        # and in-doubt transactions; None leaves them to explicit calls (tests do).
        self.housekeeping_interval = housekeeping_interval
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="twopc-phase"
        )
        self.backlog = Backlog(self._resources, log, broker, marker_batch=marker_batch)
        self.config = driver.DriverConfig(
            log=log,
            executor=self._executor,
            failpoint=self.failpoint,
            receipt_timeout=receipt_timeout,
            defer=self.backlog.defer,
            may_decide=membership.holds if membership is not None else lambda: True,
        )
        self._active: dict[str, Transaction] = {}
        self._lock = threading.Lock()
        self.outcomes: Counter[Outcome] = Counter()
        self.messages: Counter[str] = Counter()  # "business" / "marker", committed only
        # Called with each finished transaction and its outcome (metrics, tracing).
        self._listeners: list[Callable[[Transaction, Outcome], None]] = []
        self._closed = threading.Event()
        self._finishing = 0  # commit or rollback sequences running now (guarded by _lock)
        self._none_finishing = threading.Condition(self._lock)
        self._watchdog = threading.Thread(
            target=self._watch_timeouts, name="twopc-watchdog", daemon=True
        )
        self._watchdog.start()
        self.last_recovery: RecoveryReport | None = None
        self._peer_watch: threading.Thread | None = None
        try:
            if membership is not None:
                membership.join()  # before recovery: no earlier incarnation still decides
            if recover_on_start:
                self.recover()
            if membership is not None and peer_interval is not None:
                self._peer_watch = threading.Thread(
                    target=self._watch_peers, name="twopc-peers", daemon=True
                )
                self._peer_watch.start()
        except BaseException as exc:
            self._closed.set()  # no thread outlives a coordinator that failed to start
            self._watchdog.join()
            self._executor.shutdown(wait=False)
            if membership is not None:
                membership.leave()
            if not isinstance(exc, CrashInjected):  # a simulated death releases nothing
                self._release_all()  # so that a retry in this process can start
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
            raise InvalidTransition("cannot begin a transaction: the coordinator is closed")
        gtrid = gtrid_for(self.coordinator_id, gtrid)
        tx = Transaction(self, gtrid, self.timeout if timeout is None else timeout)
        with self._lock:
            taken = gtrid in self._active or self.backlog.holds(gtrid)
            if taken or gtrid in self.log.pending():
                raise DuplicateGtrid(
                    f"gtrid {gtrid} is already in use by a transaction of this coordinator"
                )
            self._active[gtrid] = tx
        return tx

    def add_listener(self, listener: Callable[[Transaction, Outcome], None]) -> None:
        """Call ``listener(tx, outcome)`` after each transaction finishes (on the caller's
        thread, after the outcome is final). A listener that raises is logged, not fatal."""
        self._listeners.append(listener)

    @property
    def resources(self) -> Mapping[str, XAResource]:
        """The XA participants, by name."""
        return self._resources

    @property
    def broker(self) -> LastResource | None:
        """The last resource, if any."""
        return self._broker

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
        reason = tx.reason
        if closed and commit:
            commit = False
            reason = "the coordinator was closed before this transaction committed"
        try:
            return self._finish(tx, commit=commit, reason=reason)
        finally:
            if not closed:
                with self._lock:
                    self._finishing -= 1
                    self._none_finishing.notify_all()

    def _finish(self, tx: Transaction, *, commit: bool, reason: str) -> Outcome:
        try:
            if commit:
                outcome = driver.commit(tx, self.config)
            else:
                outcome = driver.abort(tx, self.config, reason)
        except CrashInjected:
            raise  # a simulated death: no clean-up, exactly like a real one
        except Exception as exc:
            if tx.state in (TxState.ACTIVE, TxState.PREPARING):
                outcome = driver.abort(tx, self.config, f"{type(exc).__name__}: {exc}")
            elif tx.state is TxState.COMMITTING:
                tx.doubt_because(f"{type(exc).__name__} at the commit point: {exc}")
                outcome = Outcome.IN_DOUBT
            else:
                self._forget(tx)
                raise
        tx.finished(outcome)
        self.outcomes[outcome] += 1
        in_doubt = outcome is Outcome.IN_DOUBT and tx.branches
        table = self.log.table
        if in_doubt and tx.decision_holder is not None and table is not None:
            self.backlog.doubt(tx, partial(table.settle, tx.gtrid))
        elif in_doubt and tx.broker is not None and self._broker is not None:
            self.backlog.doubt(tx, partial(self._broker.settle, tx.broker))
        if outcome in (Outcome.ABORTED, Outcome.HEURISTIC_MIXED):
            for name, branch in tx.branches.items():
                if branch.left_prepared:
                    self.backlog.missed_rollback(name, branch.xid)
        if outcome is Outcome.COMMITTED:
            self.messages["business"] += tx.messages_sent
            self.messages["marker"] += tx.marker_sent
        self._forget(tx)
        for listener in self._listeners:
            try:
                listener(tx, outcome)
            except Exception as exc:  # an observer never changes what happened
                tx.log.warning(events.LISTENER_FAILED, listener=repr(listener), error=str(exc))
        return outcome

    def _forget(self, tx: Transaction) -> None:
        for branch in tx.branches.values():
            branch.release()
        if tx.broker is not None:
            tx.broker.release()
        with self._lock:
            self._active.pop(tx.gtrid, None)
        ended = tx.state is TxState.COMPLETED and tx.marker_sent
        if ended and self.backlog.ended(tx.gtrid) and not self._closed.is_set():
            self._executor.submit(self._contained, self.sweep_markers)  # close() sweeps the rest

    def failpoint(self, name: str) -> None:
        failpoints.hit(name)

    # -- housekeeping (the backlog's chores, also callable directly) -----------------

    def sweep_markers(self) -> int:
        """Remove the commit markers of transactions that ended (in batches)."""
        return self.backlog.sweep_markers()

    def retry_deferred(self) -> int:
        """Finish phase 2 of committed transactions whose participants failed; return count."""
        return self.backlog.retry_deferred()

    def retry_rollbacks(self) -> int:
        """Roll back, by xid, prepared branches of aborted transactions whose session died."""
        return self.backlog.retry_rollbacks()

    def resolve_in_doubt(self, timeout: float = 10.0) -> int:
        """Decide transactions whose broker COMMIT got no answer, by their marker."""
        return self.backlog.resolve_in_doubt(timeout)

    @property
    def in_doubt(self) -> list[str]:
        """Gtrids this coordinator still has to resolve."""
        return self.backlog.in_doubt

    def _watch_timeouts(self) -> None:
        """Cancel the statements of transactions that outlive their deadline; every
        ``housekeeping_interval``, work off the backlog."""
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
                tx.log.warning(events.TIMEOUT, seconds=round(now - tx.started, 3))
                for branch in tx.time_out():
                    branch.cancel()
            interval = self.housekeeping_interval
            if interval is not None and now - last_chores >= interval:
                last_chores = now
                if self.membership is not None:
                    self._contained(self.membership.keep)
                self._contained(self.backlog.work)

    def _watch_peers(self) -> None:
        """Every ``peer_interval`` seconds, recover the peers that died (docs/design.md §4)."""
        interval = self.peer_interval or 5.0
        while not self._closed.wait(interval):
            self._contained(self.recover_dead_peers)

    def recover_dead_peers(
        self, *, also_owning: Collection[str] = (), fence_timeout: float = 10.0
    ) -> list[PeerRecovery]:
        """Fence and recover every registered peer whose lock is free and that left
        prepared branches (or owns ``also_owning``); empty without membership."""
        if self.membership is None:
            return []
        done = recover_dead(
            self.membership,
            self.log,
            list(self._resources.values()),
            self._peer_broker,
            also_owning=also_owning,
            fence_timeout=fence_timeout,
        )
        if done:
            self.peer_recoveries = (self.peer_recoveries + done)[-100:]
        return done

    @staticmethod
    def _contained(chore: Callable[[], object]) -> None:
        """Run a background chore; an unexpected error is logged, never kills the thread.

        The chore's own failures (a participant down) are retried by the next
        round already; this catches the rest, so the watchdog keeps enforcing
        timeouts and the next round retries.
        """
        try:
            chore()
        except Exception as exc:
            events.get_logger().error(
                events.HOUSEKEEPING_FAILED,
                chore=getattr(chore, "__name__", repr(chore)),
                error=f"{type(exc).__name__}: {exc}",
                exc_info=True,
            )

    # -- recovery -------------------------------------------------------------

    def recover(self, *, fence_timeout: float = 30.0) -> RecoveryReport:
        """Resolve what is in doubt (see coordinator.recovery); return the report."""
        running = self.active
        if running:
            # A prepared branch of a running transaction would look in doubt and be
            # rolled back under its feet: recovery runs only while nothing is in flight.
            raise InvalidTransition(
                f"cannot recover: recovery needs the coordinator idle; {len(running)} "
                "transactions are running"
            )
        self.backlog.forget_in_doubt()  # a full pass fences and decides these too
        report = Recovery(
            self.coordinator_id, self.log, list(self._resources.values()), self._broker
        ).run(fence_timeout=fence_timeout)
        self.last_recovery = report
        return report

    # -- stats and shutdown ---------------------------------------------------

    def stats(self) -> Mapping[str, Any]:
        """Counters for reports: outcomes, forced log writes, committed messages."""
        return stats_of(self.outcomes, self.messages, self.log.forced_writes)

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
        if self._peer_watch is not None:
            self._peer_watch.join()
        released(self.backlog.work, "the backlog")
        released(self.sweep_markers, "the marker sweep")
        released(self.log.flush, "the decision log's flush")  # an unusable log: logged
        self._executor.shutdown(wait=True)
        self._release_all()
        if self.membership is not None:
            self.membership.leave()

    def _release_all(self) -> None:
        """Close the participants, the broker and the log (its lock): the coordinator owns
        them. Each step runs even if one before it failed."""
        for name, resource in self._resources.items():
            released(resource.close, f"participant {name!r}")
        if self._broker is not None:
            released(self._broker.close, f"participant {self._broker.name!r}")
        released(self.log.close, "the decision log")

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
