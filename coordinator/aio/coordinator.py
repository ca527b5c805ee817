"""The coordinator: owns the participants, the decision log and the background work; runs
transactions.

Written once, for asyncio (``coordinator/aio/coordinator.py``); the thread
coordinator (``coordinator/coordinator.py``) is generated from it by
``scripts/unasync.py``, and what differs between tasks and threads is in
:mod:`coordinator.compat`. Both have the same members: membership and the
liveness check, listeners, the backlog (docs/design.md §2).

The walk of one gtrid: ``begin`` makes a transaction; its work runs on the
participants' branches; ``finish`` hands it to the commit sequence (the
driver); whatever that could not finish goes to the
:class:`~coordinator.backlog.Backlog`, and a crash leaves it to
:class:`~coordinator.recovery.Recovery` at the next start. Recovery, the
backlog and the decision log are synchronous: over asyncio participants they
use each one's synchronous view of the same server, in a worker thread.

Usage::

    async with AsyncCoordinator("orders", log, [resource_a, resource_b]) as coordinator:
        async with coordinator.transaction() as tx:
            await tx.execute("a", "INSERT ...")
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

from coordinator import events, failpoints, protocol, tracing
from coordinator.aio import driver
from coordinator.aio.transaction import AsyncTransaction
from coordinator.backlog import Backlog, Resolved, Unfinished
from coordinator.compat import (
    ACancelled,
    AEvent,
    acancel,
    afrom_thread,
    ajoin,
    arecovery_broker,
    arecovery_view,
    arelease_refused,
    ashield,
    aspawn,
    astart_in_init,
    ato_thread,
    await_event,
)
from coordinator.errors import (
    ConfigurationError,
    CrashInjected,
    DuplicateGtrid,
    InvalidTransition,
    InvalidXid,
)
from coordinator.log import DecisionLog
from coordinator.peers import PeerRecovery, recover_dead
from coordinator.protocol import (
    AsyncLastResource,
    AsyncXAResource,
    DecisionHolder,
    LastResource,
    Membership,
)
from coordinator.recovery import Recovery, RecoveryReport
from coordinator.states import BEFORE_COMMIT_POINT, TERMINAL, Outcome, TxState
from coordinator.xid import gtrid_prefix, new_gtrid, validate_coordinator_id, validate_id


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)

#: Told of each finished transaction and of what the backlog resolved later.
Listener = Callable[[AsyncTransaction | Resolved, Outcome], None]


def by_name(resources: Sequence[N]) -> dict[str, N]:
    """The participants by name; ConfigurationError for a bad or repeated name."""
    named: dict[str, N] = {}
    for resource in resources:
        validate_id("participant name", resource.name)
        if resource.name in named:
            raise ConfigurationError(f"two participants are named {resource.name!r}")
        named[resource.name] = resource
    return named


def stats_of(
    outcomes: Counter[Outcome], messages: Counter[str], forced_writes: int
) -> dict[str, Any]:
    """A coordinator's counters for reports: outcomes, forced log writes, committed messages."""
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


async def _released(step: Callable[[], Awaitable[object]], what: str) -> None:
    """:func:`released` for a participant's close."""
    try:
        await step()
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


class AsyncCoordinator:
    """Runs global transactions over XA resources and at most one last resource (a broker).

    One coordinator per decision log. Starting it runs recovery first (unless
    told not to), so that what a crashed predecessor left prepared is resolved.
    An asyncio coordinator starts when its block is entered (or on :meth:`start`;
    recovery and its tasks need the running loop); a thread one as it is made.
    """

    def __init__(
        self,
        coordinator_id: str,
        log: DecisionLog,
        resources: Sequence[AsyncXAResource],
        broker: AsyncLastResource | None = None,
        *,
        timeout: float = 30.0,
        receipt_timeout: float = 5.0,
        max_workers: int = 32,
        recover_on_start: bool = True,
        marker_batch: int = 500,
        housekeeping_interval: float | None = 1.0,
        membership: Membership | None = None,
        decision_holder: DecisionHolder | None = None,
        peer_broker: Callable[[str], LastResource | None] | None = None,
        peer_interval: float | None = 5.0,
    ) -> None:
        self.log = log
        self._broker = broker
        tracing.decide()  # once, not per transaction: is a tracer provider set?
        try:
            self.coordinator_id = validate_coordinator_id(coordinator_id)
            self.prefix = gtrid_prefix(coordinator_id)
            self._resources: dict[str, AsyncXAResource] = by_name(resources)
        except BaseException:
            # The coordinator owns what it was given, even when refused.
            self._resources = {r.name: r for r in resources}
            arelease_refused(self._release_all, partial(released, log.close, "the decision log"))
            raise
        # The participant that holds the decisions as rows, if any (docs/design.md §3): a
        # role this coordinator is given; its decision log then keeps no records.
        self.decision_holder = decision_holder
        # Many coordinators (docs/design.md §4): this one's liveness lock, the broker of a dead
        # peer by its id (for fencing and its markers), and how often to look for one.
        self.membership = membership
        self._peer_broker = peer_broker or (lambda peer: None)
        self.peer_interval = peer_interval
        self.peer_recoveries: list[PeerRecovery] = []  # the latest ones, newest last
        self.timeout = timeout
        self.receipt_timeout = receipt_timeout
        self.recover_on_start = recover_on_start
        # Seconds between the watchdog's retries of deferred phase 2s, missed rollbacks
        # and in-doubt transactions; None leaves them to explicit calls (tests do).
        self.housekeeping_interval = housekeeping_interval
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="twopc-phase"
        )
        self.marker_batch = marker_batch
        # Recovery and the backlog are synchronous: they see each participant through its
        # synchronous view (the participant itself, for a synchronous one), taken at start.
        self._recovery_resources = {n: arecovery_view(r) for n, r in self._resources.items()}
        self._recovery_broker: LastResource | None = None
        self._backlog: Backlog | None = None
        self.config = driver.AsyncDriverConfig(
            log=log,
            executor=self._executor,
            failpoint=self.failpoint,
            receipt_timeout=receipt_timeout,
            defer=self._defer,
            decision_holder=decision_holder,
            may_decide=membership.holds if membership is not None else lambda: True,
        )
        self._active: dict[str, AsyncTransaction] = {}
        self._lock = threading.Lock()  # never held across an await
        self.outcomes: Counter[Outcome] = Counter()
        self.messages: Counter[str] = Counter()  # "business" / "marker", committed only
        # Called with each finished transaction and its outcome, and with what the backlog
        # resolved later (metrics, tracing).
        self._listeners: list[Listener] = []
        self._closed = AEvent()
        self._finishing = 0  # commit or rollback sequences running now (guarded by _lock)
        self._none_finishing = AEvent()
        self._none_finishing.set()
        self._started = False
        self._watchdog: Any = None  # the timeout and housekeeping loop (a task / a thread)
        self._peer_watch: Any = None  # the loop that recovers dead peers
        self.last_recovery: RecoveryReport | None = None
        astart_in_init(self.start)

    # -- starting and stopping --------------------------------------------------------

    async def start(self) -> AsyncCoordinator:
        """Join the membership, recover (unless told not to), then start the background work.

        A start that fails releases everything (but a simulated death), so that a
        retry in this process can start.
        """
        if self._started:
            return self
        self._started = True
        # The broker's view needs the running loop (an asyncio broker lends it its sessions).
        self._recovery_broker = arecovery_broker(self._broker)
        self._backlog = Backlog(
            self._recovery_resources,
            self.log,
            self._recovery_broker,
            marker_batch=self.marker_batch,
            decision_holder=self.decision_holder,
            report=self._report_resolved,
        )
        membership = self.membership
        try:
            if membership is not None:
                await ato_thread(membership.join)  # before recovery: no earlier incarnation
            if self.recover_on_start:
                await self.recover()
        except BaseException as exc:
            self._closed.set()
            await ato_thread(self._executor.shutdown, False)
            if membership is not None:
                await ato_thread(membership.leave)
            if not isinstance(exc, CrashInjected):  # a simulated death releases nothing
                await self._release_all()
            raise
        self._watchdog = aspawn(self._watch_timeouts, "twopc-watchdog")
        if membership is not None and self.peer_interval is not None:
            self._peer_watch = aspawn(self._watch_peers, "twopc-peers")
        return self

    @property
    def backlog(self) -> Backlog:
        """What the commit sequence could not finish (see :mod:`coordinator.backlog`)."""
        if self._backlog is None:
            raise InvalidTransition("the coordinator is not started: call start() first")
        return self._backlog

    async def __aenter__(self) -> AsyncCoordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transactions ---------------------------------------------------------

    @asynccontextmanager
    async def transaction(
        self, gtrid: str | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[AsyncTransaction]:
        """A new global transaction; commits when the block ends (see AsyncTransaction).

        With asyncio, a task cancelled inside the block rolls the transaction
        back (the rollback itself is shielded from the cancellation) before the
        cancellation goes on.
        """
        tx = self.begin(gtrid, timeout=timeout)
        async with tx:
            try:
                yield tx
            except ACancelled:
                if tx.state is TxState.ACTIVE:
                    await ashield(tx.rollback("the task was cancelled"))
                raise

    def begin(self, gtrid: str | None = None, *, timeout: float | None = None) -> AsyncTransaction:
        """Start a global transaction; ``gtrid`` must carry this coordinator's prefix."""
        if self._closed.is_set():
            raise InvalidTransition("cannot begin a transaction: the coordinator is closed")
        if not self._started:
            raise InvalidTransition("the coordinator is not started: call start() first")
        gtrid = gtrid_for(self.coordinator_id, gtrid)
        tx = AsyncTransaction(self, gtrid, self.timeout if timeout is None else timeout)
        with self._lock:
            taken = gtrid in self._active or self.backlog.holds(gtrid)
            if taken or gtrid in self.log.pending():
                raise DuplicateGtrid(
                    f"gtrid {gtrid} is already in use by a transaction of this coordinator"
                )
            self._active[gtrid] = tx
        return tx

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(tx, outcome)`` after each transaction finishes (where it
        finished, after the outcome is final), and ``listener(resolved, resolved.outcome)``
        with a :class:`~coordinator.backlog.Resolved` when the backlog later finishes or
        decides a transaction whose caller was told IN_DOUBT, or COMMITTED with phase 2
        unfinished (in a worker thread). A listener that raises is logged, not fatal."""
        self._listeners.append(listener)

    def _tell_listeners(self, finished: AsyncTransaction | Resolved, outcome: Outcome) -> None:
        for listener in self._listeners:
            try:
                listener(finished, outcome)
            except Exception as exc:  # an observer never changes what happened
                events.get_logger(gtrid=finished.gtrid).warning(
                    events.LISTENER_FAILED, listener=repr(listener), error=str(exc)
                )

    def _report_resolved(self, resolved: Resolved) -> None:
        self._tell_listeners(resolved, resolved.outcome)

    @property
    def resources(self) -> Mapping[str, AsyncXAResource]:
        """The XA participants, by name."""
        return self._resources

    @property
    def broker(self) -> AsyncLastResource | None:
        """The last resource, if any."""
        return self._broker

    @property
    def recovery_resources(self) -> Mapping[str, protocol.XAResource]:
        """The XA participants by name as recovery, the backlog and metrics read them: each
        one's synchronous view (the participant itself, for a synchronous one)."""
        return self._recovery_resources

    @property
    def recovery_broker(self) -> LastResource | None:
        """The last resource's synchronous view; None without one, or before start."""
        return self._recovery_broker

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (or a simulated death) has stopped this coordinator."""
        return self._closed.is_set()

    async def finish(self, tx: AsyncTransaction, *, commit: bool) -> Outcome:
        """Run the commit (or rollback) sequence; called by AsyncTransaction.commit/rollback.

        The sequence runs to its end even if the caller's task is cancelled (the
        caller gets CancelledError; the outcome is the one the sequence reaches).
        After close() has begun, a transaction that was still open is rolled back
        instead of committed (its reason says so): its decision could no longer be
        logged.
        """
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._finishing += 1
                self._none_finishing.clear()
        reason = tx.reason
        if closed and commit:
            commit = False
            reason = "the coordinator was closed before this transaction committed"
        counted = not closed
        return await ashield(
            self._finish_counted(tx, commit=commit, reason=reason, counted=counted)
        )

    async def _finish_counted(
        self, tx: AsyncTransaction, *, commit: bool, reason: str, counted: bool
    ) -> Outcome:
        try:
            return await self._finish(tx, commit=commit, reason=reason)
        finally:
            if counted:
                with self._lock:
                    self._finishing -= 1
                    if self._finishing == 0:
                        self._none_finishing.set()

    async def _finish(self, tx: AsyncTransaction, *, commit: bool, reason: str) -> Outcome:
        try:
            if commit:
                outcome = await driver.commit(tx, self.config)
            else:
                outcome = await driver.abort(tx, self.config, reason)
        except CrashInjected:
            raise  # a simulated death: no clean-up, exactly like a real one
        except Exception as exc:
            if tx.state in BEFORE_COMMIT_POINT:
                outcome = await driver.abort(tx, self.config, f"{type(exc).__name__}: {exc}")
            elif tx.state is TxState.COMMITTING:
                tx.doubt_because(f"{type(exc).__name__} at the commit point: {exc}")
                outcome = Outcome.IN_DOUBT
            else:
                await self._forget(tx)
                raise
        tx.finished(outcome)
        self.outcomes[outcome] += 1
        in_doubt = outcome is Outcome.IN_DOUBT and tx.branches
        holder = self.decision_holder
        if in_doubt and tx.decision_carrier is not None and holder is not None:
            self.backlog.doubt(Unfinished.of(tx), partial(holder.settle, tx.gtrid))
        elif in_doubt and tx.broker is not None and self._broker is not None:
            self.backlog.doubt(Unfinished.of(tx), afrom_thread(self._broker.settle, tx.broker))
        if outcome in (Outcome.ABORTED, Outcome.HEURISTIC_MIXED):
            for name, branch in tx.branches.items():
                if branch.left_prepared:  # PostgreSQL's may name a session to end first
                    lost = getattr(branch, "lost_session", None)
                    self.backlog.missed_rollback(name, branch.xid, lost_session=lost)
        if outcome is Outcome.COMMITTED:
            self.messages["business"] += tx.messages_sent
            self.messages["marker"] += tx.marker_sent
        await self._forget(tx)
        self._tell_listeners(tx, outcome)
        return outcome

    def _defer(self, tx: AsyncTransaction) -> None:
        """Phase 2 of committed ``tx`` is unfinished: the backlog finishes it."""
        self.backlog.defer(Unfinished.of(tx))

    async def _forget(self, tx: AsyncTransaction) -> None:
        for branch in tx.branches.values():
            await branch.release()
        if tx.broker is not None:
            await tx.broker.release()
        with self._lock:
            self._active.pop(tx.gtrid, None)
        ended = tx.state is TxState.COMPLETED and tx.marker_sent
        if ended and self.backlog.ended(tx.gtrid) and not self._closed.is_set():
            # close() sweeps the rest
            self._executor.submit(self._contained, self.backlog.sweep_markers)

    def prepares_early(self, participant: str) -> bool:
        """A branch whose work is ended prepares now when other transactions are in flight
        here (the CPU of a round trip saved counts then), and never on the participant
        that holds the decision rows: the commit point may put its row into that branch
        (docs/design.md §3). The count is read without the lock: a hint."""
        holder = self.decision_holder
        if holder is not None and holder.participant == participant:
            return False
        return len(self._active) > 1

    def failpoint(self, name: str) -> None:
        failpoints.hit(name)

    # -- housekeeping (the backlog's chores, also callable directly) -----------------

    async def sweep_markers(self) -> int:
        """Remove the commit markers of transactions that ended (in batches)."""
        return await ato_thread(self.backlog.sweep_markers)

    async def retry_deferred(self) -> int:
        """Finish phase 2 of committed transactions whose participants failed; return count."""
        return await ato_thread(self.backlog.retry_deferred)

    async def retry_rollbacks(self) -> int:
        """Roll back, by xid, prepared branches of aborted transactions whose session died."""
        return await ato_thread(self.backlog.retry_rollbacks)

    async def resolve_in_doubt(self, timeout: float = 10.0) -> int:
        """Decide transactions whose commit point got no answer, by their marker or row."""
        return await ato_thread(self.backlog.resolve_in_doubt, timeout)

    @property
    def in_doubt(self) -> list[str]:
        """Gtrids this coordinator still has to resolve."""
        return self.backlog.in_doubt

    async def _watch_timeouts(self) -> None:
        """Cancel the statements of transactions that outlive their deadline; every
        ``housekeeping_interval``, keep the liveness lock and work off the backlog."""
        last_chores = time.monotonic()
        while not await await_event(self._closed, 0.2):
            await self._contained_step(self._time_out_late)
            now = time.monotonic()
            interval = self.housekeeping_interval
            if interval is not None and now - last_chores >= interval:
                last_chores = now
                if self.membership is not None:
                    await ato_thread(self._contained, self.membership.keep)
                await ato_thread(self._contained, self.backlog.work)

    async def _time_out_late(self) -> None:
        """Mark the transactions past their deadline timed out and cancel their work, or
        their phase 1: work deferred to the PREPARE can wait there for a lock."""
        now = time.monotonic()
        with self._lock:
            late = [
                tx
                for tx in self._active.values()
                if tx.state in BEFORE_COMMIT_POINT and now > tx.deadline and not tx.timed_out
            ]
        for tx in late:
            branches = tx.time_out()  # marked before it is logged (docs/design.md §2)
            if not tx.timed_out:
                continue  # it stepped to its commit point meanwhile: it decides
            events.log_contained(
                events.TIMEOUT,
                level="warning",
                logger=tx.log,
                seconds=round(now - tx.started, 3),
                during=tx.state.value,  # "active" (the work) or "preparing" (phase 1)
            )
            for branch in branches:
                await self._contained_step(branch.cancel)

    async def _watch_peers(self) -> None:
        """Every ``peer_interval`` seconds, recover the peers that died (docs/design.md §4)."""
        interval = self.peer_interval or 5.0
        while not await await_event(self._closed, interval):
            await self._contained_step(self.recover_dead_peers)

    async def recover_dead_peers(
        self, *, also_owning: Collection[str] = (), fence_timeout: float = 10.0
    ) -> list[PeerRecovery]:
        """Fence and recover every registered peer whose lock is free and that left
        prepared branches (or owns ``also_owning``); empty without membership."""
        if self.membership is None:
            return []
        done = await ato_thread(
            recover_dead,
            self.membership,
            self.log,
            list(self._recovery_resources.values()),
            self._peer_broker,
            decision_holder=self.decision_holder,
            also_owning=also_owning,
            fence_timeout=fence_timeout,
        )
        if done:
            self.peer_recoveries = (self.peer_recoveries + done)[-100:]
        return done

    async def _contained_step(self, step: Callable[[], Awaitable[object]]) -> None:
        """Run a watchdog step; an unexpected error is logged, never ends the watchdog
        (nor does a log call that fails: :func:`~coordinator.events.log_contained`)."""
        try:
            await step()
        except Exception as exc:
            events.log_contained(
                events.HOUSEKEEPING_FAILED,
                chore=getattr(step, "__name__", repr(step)),
                error=f"{type(exc).__name__}: {exc}",
                exc_info=True,
            )

    @staticmethod
    def _contained(chore: Callable[[], object]) -> None:
        """Run a background chore (in a worker thread); an unexpected error is logged.

        The chore's own failures (a participant down) are retried by the next
        round already; this catches the rest, so the watchdog keeps enforcing
        timeouts and the next round retries.
        """
        try:
            chore()
        except Exception as exc:
            events.log_contained(
                events.HOUSEKEEPING_FAILED,
                chore=getattr(chore, "__name__", repr(chore)),
                error=f"{type(exc).__name__}: {exc}",
                exc_info=True,
            )

    # -- recovery -------------------------------------------------------------

    async def recover(self, *, fence_timeout: float = 30.0) -> RecoveryReport:
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
        recovery = Recovery(
            self.coordinator_id,
            self.log,
            list(self._recovery_resources.values()),
            self._recovery_broker,
            decision_holder=self.decision_holder,
        )
        report = await ato_thread(recovery.run, fence_timeout=fence_timeout)
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

    def stop_without_cleanup(self) -> None:
        """The process is gone (tests): stop the background work, clean nothing up."""
        self._closed.set()
        acancel(self._watchdog)
        acancel(self._peer_watch)

    async def close(self) -> None:
        """Finish housekeeping and release connections, workers and the log's lock.

        Commits already running finish first (up to ``timeout`` seconds); a
        transaction still open is rolled back when its owner ends it.
        """
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        await await_event(self._none_finishing, self.timeout)
        await ajoin(self._watchdog)
        await ajoin(self._peer_watch)
        backlog = self._backlog
        if backlog is not None:  # None: never started
            await ato_thread(released, backlog.work, "the backlog")
            await ato_thread(released, backlog.sweep_markers, "the marker sweep")
        await ato_thread(released, self.log.flush, "the decision log's flush")
        await ato_thread(self._executor.shutdown, True)
        await self._release_all()
        if self.membership is not None:
            await ato_thread(self.membership.leave)

    async def _release_all(self) -> None:
        """Close the participants, the broker and the log (its lock): the coordinator owns
        them. Each step runs even if one before it failed."""
        for name, resource in self._resources.items():
            await _released(resource.close, f"participant {name!r}")
        if self._broker is not None:
            await _released(self._broker.close, f"participant {self._broker.name!r}")
        await ato_thread(released, self.log.close, "the decision log")
