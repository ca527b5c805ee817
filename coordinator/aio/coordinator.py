"""The asyncio coordinator: the same protocol, log and recovery as the sync one, on tasks.

The commit sequence is :mod:`coordinator.aio.driver` (the source the sync
driver is generated from). Participants are asyncio ones (``psycopg``'s
``AsyncConnection``, an asyncio STOMP client). The decision log is the same
file log; its writes run in a worker thread. Recovery is the sync
:class:`~coordinator.recovery.Recovery` (the one :func:`~coordinator.recovery.decide`
and :func:`~coordinator.recovery.resolve`) over each participant's synchronous
view of the same server, run in a worker thread at start and on
:meth:`AsyncCoordinator.recover`; the background retries are the same
:class:`~coordinator.recovery.Backlog`, also in a worker thread.

Usage::

    async with AsyncCoordinator("orders", log, [AsyncPostgresResource("a", DSN)]) as coordinator:
        async with coordinator.transaction() as tx:
            await tx.execute("a", "INSERT ...")
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from coordinator import events, failpoints
from coordinator.aio import driver
from coordinator.aio.transaction import AsyncTransaction
from coordinator.coordinator import by_name, gtrid_for, released, stats_of
from coordinator.errors import CrashInjected, DuplicateGtrid, InvalidTransition
from coordinator.log import DecisionLog
from coordinator.protocol import AsyncLastResource, AsyncLastResourceSession, AsyncXAResource
from coordinator.recovery import Backlog, Recovery, RecoveryReport
from coordinator.states import TERMINAL, Outcome, TxState
from coordinator.xid import gtrid_prefix, validate_coordinator_id


class AsyncCoordinator:
    """Runs global transactions from asyncio code; one coordinator per decision log.

    Use it as ``async with AsyncCoordinator(...) as coordinator:`` (or call
    :meth:`start` and :meth:`close`): starting runs recovery first, unless told
    not to, so that what a crashed predecessor left prepared is resolved.
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
        recover_on_start: bool = True,
        marker_batch: int = 500,
        housekeeping_interval: float | None = 1.0,
    ) -> None:
        self.log = log
        try:
            self.coordinator_id = validate_coordinator_id(coordinator_id)
            self.prefix = gtrid_prefix(coordinator_id)
            self._resources: dict[str, AsyncXAResource] = by_name(resources)
        except BaseException:
            # The coordinator owns the log it was given, even when refused (the
            # participants have not connected yet: closing them needs the event loop).
            released(log.close, "the decision log")
            raise
        self._broker = broker
        self.timeout = timeout
        self.receipt_timeout = receipt_timeout
        self.recover_on_start = recover_on_start
        self.marker_batch = marker_batch
        self.housekeeping_interval = housekeeping_interval
        self.config = driver.AsyncDriverConfig(
            log=log, failpoint=self.failpoint, receipt_timeout=receipt_timeout, defer=self._defer
        )
        self._backlog: Backlog | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: dict[str, AsyncTransaction] = {}
        self.outcomes: Counter[Outcome] = Counter()
        self.messages: Counter[str] = Counter()  # "business" / "marker", committed only
        self._closed = False
        self._finishing: set[asyncio.Task[Outcome]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Future[Any]] = set()
        self.last_recovery: RecoveryReport | None = None

    # -- starting and stopping --------------------------------------------------------

    async def start(self) -> AsyncCoordinator:
        """Recover (in a worker thread) unless told not to, then start the watchdog."""
        if self._backlog is not None:
            return self
        self._loop = asyncio.get_running_loop()
        recovery_resources = {n: r.recovery_resource() for n, r in self._resources.items()}
        recovery_broker = self._broker.recovery_broker() if self._broker is not None else None
        self._recovery = (list(recovery_resources.values()), recovery_broker)
        self._backlog = Backlog(
            recovery_resources, self.log, recovery_broker, marker_batch=self.marker_batch
        )
        if self.recover_on_start:
            try:
                await self.recover()
            except BaseException as exc:
                self._closed = True
                if not isinstance(exc, CrashInjected):  # a simulated death releases nothing
                    await self._release_all()  # so that a retry in this process can start
                raise
        self._watchdog = asyncio.create_task(self._watch_timeouts(), name="twopc-watchdog")
        return self

    async def __aenter__(self) -> AsyncCoordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def backlog(self) -> Backlog:
        """What the commit sequence could not finish (a :class:`~coordinator.recovery.Backlog`)."""
        if self._backlog is None:
            raise InvalidTransition("the coordinator is not started: call 'await start()'")
        return self._backlog

    # -- transactions ---------------------------------------------------------

    @asynccontextmanager
    async def transaction(
        self, gtrid: str | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[AsyncTransaction]:
        """A new global transaction; commits when the block ends (see AsyncTransaction).

        A task cancelled inside the block rolls the transaction back (the
        rollback itself is shielded from the cancellation) before the
        cancellation goes on.
        """
        tx = self.begin(gtrid, timeout=timeout)
        async with tx:
            try:
                yield tx
            except asyncio.CancelledError:
                if tx.state is TxState.ACTIVE:
                    await asyncio.shield(tx.rollback("the task was cancelled"))
                raise

    def begin(self, gtrid: str | None = None, *, timeout: float | None = None) -> AsyncTransaction:
        """Start a global transaction; ``gtrid`` must carry this coordinator's prefix."""
        if self._closed:
            raise InvalidTransition("cannot begin a transaction: the coordinator is closed")
        backlog = self.backlog
        gtrid = gtrid_for(self.coordinator_id, gtrid)
        taken = gtrid in self._active or backlog.holds(gtrid)
        if taken or gtrid in self.log.pending():
            raise DuplicateGtrid(
                f"gtrid {gtrid} is already in use by a transaction of this coordinator"
            )
        tx = AsyncTransaction(self, gtrid, self.timeout if timeout is None else timeout)
        self._active[gtrid] = tx
        return tx

    @property
    def resources(self) -> Mapping[str, AsyncXAResource]:
        """The XA participants, by name."""
        return self._resources

    @property
    def broker(self) -> AsyncLastResource | None:
        """The last resource, if any."""
        return self._broker

    async def finish(self, tx: AsyncTransaction, *, commit: bool) -> Outcome:
        """Run the commit (or rollback) sequence; called by AsyncTransaction.commit/rollback.

        The sequence runs in a task of its own, shielded: cancelling the caller
        does not stop a commit half way (the caller gets CancelledError; the
        outcome is the one the sequence reaches). After close() has begun, an
        open transaction is rolled back instead of committed.
        """
        reason = tx.reason
        if self._closed and commit:
            commit = False
            reason = "the coordinator was closed before this transaction committed"
        task = asyncio.create_task(self._finish(tx, commit=commit, reason=reason))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        return await asyncio.shield(task)

    async def _finish(self, tx: AsyncTransaction, *, commit: bool, reason: str) -> Outcome:
        try:
            if commit:
                outcome = await driver.commit(tx, self.config)
            else:
                outcome = await driver.abort(tx, self.config, reason)
        except CrashInjected:
            raise  # a simulated death: no clean-up, exactly like a real one
        except Exception as exc:
            if tx.state in (TxState.ACTIVE, TxState.PREPARING):
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
        if in_doubt and tx.broker is not None and self._broker is not None:
            self.backlog.doubt(tx, self._settler(self._broker, tx.broker))
        if outcome in (Outcome.ABORTED, Outcome.HEURISTIC_MIXED):
            for name, branch in tx.branches.items():
                if branch.left_prepared:
                    self.backlog.missed_rollback(name, branch.xid)
        if outcome is Outcome.COMMITTED:
            self.messages["business"] += tx.messages_sent
            self.messages["marker"] += tx.marker_sent
        await self._forget(tx)
        return outcome

    def _settler(
        self, broker: AsyncLastResource, session: AsyncLastResourceSession
    ) -> Callable[[float], None]:
        """How the backlog (in a worker thread) settles ``session`` on the event loop."""
        loop = self._loop
        assert loop is not None

        def settle(timeout: float) -> None:
            asyncio.run_coroutine_threadsafe(broker.settle(session, timeout), loop).result()

        return settle

    def _defer(self, tx: AsyncTransaction) -> None:
        self.backlog.defer(tx)

    async def _forget(self, tx: AsyncTransaction) -> None:
        for branch in tx.branches.values():
            await branch.release()
        if tx.broker is not None:
            await tx.broker.release()
        self._active.pop(tx.gtrid, None)
        ended = tx.state is TxState.COMPLETED and tx.marker_sent
        if ended and self.backlog.ended(tx.gtrid) and not self._closed:
            self._in_thread(self.backlog.sweep_markers)  # close() sweeps the rest

    def failpoint(self, name: str) -> None:
        failpoints.hit(name)

    # -- housekeeping (the backlog's chores, in a worker thread) ---------------------

    async def sweep_markers(self) -> int:
        """Remove the commit markers of transactions that ended (in batches)."""
        return await asyncio.to_thread(self.backlog.sweep_markers)

    async def retry_deferred(self) -> int:
        """Finish phase 2 of committed transactions whose participants failed; return count."""
        return await asyncio.to_thread(self.backlog.retry_deferred)

    async def retry_rollbacks(self) -> int:
        """Roll back, by xid, prepared branches of aborted transactions whose session died."""
        return await asyncio.to_thread(self.backlog.retry_rollbacks)

    async def resolve_in_doubt(self, timeout: float = 10.0) -> int:
        """Decide transactions whose broker COMMIT got no answer, by their marker."""
        return await asyncio.to_thread(self.backlog.resolve_in_doubt, timeout)

    @property
    def in_doubt(self) -> list[str]:
        """Gtrids this coordinator still has to resolve."""
        return self.backlog.in_doubt

    def _in_thread(self, chore: Callable[[], object]) -> None:
        """Run a background chore in a worker thread, contained (see _contained)."""
        future = asyncio.ensure_future(asyncio.to_thread(self._contained, chore))
        self._chores.add(future)
        future.add_done_callback(self._chores.discard)

    async def _watch_timeouts(self) -> None:
        """Cancel the statements of transactions that outlive their deadline; every
        ``housekeeping_interval``, work off the backlog (in a worker thread)."""
        last_chores = time.monotonic()
        while not self._closed:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            late = [
                tx
                for tx in self._active.values()
                if tx.state is TxState.ACTIVE and now > tx.deadline and not tx.timed_out
            ]
            for tx in late:
                tx.log.warning(events.TIMEOUT, seconds=round(now - tx.started, 3))
                for branch in tx.time_out():
                    await self._contained_async(branch.cancel)
            interval = self.housekeeping_interval
            if interval is not None and now - last_chores >= interval:
                last_chores = now
                await asyncio.to_thread(self._contained, self.backlog.work)

    async def _contained_async(self, step: Callable[[], Awaitable[object]]) -> None:
        """Await a watchdog step; an unexpected error is logged, never ends the watchdog."""
        try:
            await step()
        except Exception as exc:
            events.get_logger().error(
                events.HOUSEKEEPING_FAILED,
                chore=getattr(step, "__name__", repr(step)),
                error=f"{type(exc).__name__}: {exc}",
                exc_info=True,
            )

    @staticmethod
    def _contained(chore: Callable[[], object]) -> None:
        """Run a background chore; an unexpected error is logged, never kills the task."""
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

    async def recover(self, *, fence_timeout: float = 30.0) -> RecoveryReport:
        """Resolve what is in doubt (the sync Recovery, in a worker thread); return the report."""
        running = self.active
        if running:
            raise InvalidTransition(
                f"cannot recover: recovery needs the coordinator idle; {len(running)} "
                "transactions are running"
            )
        self.backlog.forget_in_doubt()  # a full pass fences and decides these too
        resources, broker = self._recovery
        recovery = Recovery(self.coordinator_id, self.log, resources, broker)
        report = await asyncio.to_thread(recovery.run, fence_timeout=fence_timeout)
        self.last_recovery = report
        return report

    # -- stats and shutdown ---------------------------------------------------

    def stats(self) -> Mapping[str, Any]:
        """Counters for reports: outcomes, forced log writes, committed messages."""
        return stats_of(self.outcomes, self.messages, self.log.forced_writes)

    @property
    def active(self) -> list[str]:
        return [g for g, tx in self._active.items() if tx.state not in TERMINAL]

    def stop_without_cleanup(self) -> None:
        """The process is gone (tests): stop the watchdog, clean nothing up."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def close(self) -> None:
        """Finish housekeeping and release connections and the log's lock.

        Commits already running finish first (up to ``timeout`` seconds); a
        transaction still open is rolled back when its owner ends it.
        """
        if self._closed:
            return
        self._closed = True
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=self.timeout)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with suppress(asyncio.CancelledError):
                await self._watchdog
        if self._chores:
            await asyncio.wait(set(self._chores))
        backlog = self._backlog
        if backlog is not None:
            await asyncio.to_thread(released, backlog.work, "the backlog")
            await asyncio.to_thread(released, backlog.sweep_markers, "the marker sweep")
        await asyncio.to_thread(released, self.log.flush, "the decision log's flush")
        await self._release_all()

    async def _release_all(self) -> None:
        """Close the participants, the broker and the log (its lock): the coordinator owns
        them. Each step runs even if one before it failed."""
        for name, resource in self._resources.items():
            await _released(resource.close, f"participant {name!r}")
        if self._broker is not None:
            await _released(self._broker.close, f"participant {self._broker.name!r}")
        await asyncio.to_thread(released, self.log.close, "the decision log")


async def _released(step: Callable[[], Awaitable[object]], what: str) -> None:
    """:func:`~coordinator.coordinator.released` for a coroutine step."""
    try:
        await step()
    except Exception as exc:
        events.get_logger().warning(
            events.RELEASE_FAILED, what=what, error=f"{type(exc).__name__}: {exc}"
        )
