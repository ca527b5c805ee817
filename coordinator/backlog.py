"""The backlog: what a running coordinator's commit sequence could not finish, worked off
in the background (docs/design.md §5).

It keeps what it needs of each transaction -- the gtrid, the names of its
branches, how its commit point was carried, how to settle the session that
carried it -- and never the caller's transaction: an outcome never changes
after the caller has it. What the backlog resolves later is reported as a
:class:`Resolved` to the coordinator's listeners (the ones metrics use).
Every decision goes through :func:`~coordinator.recovery.evidence` and
:func:`~coordinator.recovery.resolve`, the same as recovery's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from coordinator import events
from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from coordinator.log import DecisionLog
from coordinator.protocol import DecisionHolder, LastResource, XAResource
from coordinator.recovery import Decision, InDoubt, evidence, resolve
from coordinator.states import Outcome
from coordinator.xid import Xid


class _Finished(Protocol):
    """What :meth:`Unfinished.of` reads of a transaction (sync or asyncio)."""

    @property
    def gtrid(self) -> str: ...

    @property
    def branches(self) -> Mapping[str, object]: ...

    @property
    def marker_sent(self) -> bool: ...

    @property
    def decision_carrier(self) -> str | None: ...


@dataclass(frozen=True)
class Unfinished:
    """What the backlog keeps of a transaction it finishes (never the transaction)."""

    gtrid: str
    branches: tuple[str, ...]  # the XA participants with a branch, by name
    marker_sent: bool  # the broker's COMMIT carried its marker
    decision_carrier: str | None  # the participant whose branch carried the decision row

    @classmethod
    def of(cls, tx: _Finished) -> Unfinished:
        """The backlog's record of ``tx``, taken when the commit sequence hands it over."""
        return cls(tx.gtrid, tuple(tx.branches), tx.marker_sent, tx.decision_carrier)


@dataclass(frozen=True)
class Resolved:
    """What the backlog did with a gtrid after its caller had the outcome: reported to the
    coordinator's listeners as ``listener(resolved, resolved.outcome)``.

    ``outcome`` is COMMITTED (phase 2 finished, or an in-doubt commit point decided
    by its marker or row) or ABORTED (an in-doubt commit point decided to roll back).
    """

    gtrid: str
    outcome: Outcome
    was: Outcome  # what the caller was told: IN_DOUBT, or COMMITTED for a deferred phase 2
    done: tuple[str, ...]  # "b: committed", ...


def _nothing_resolved(resolved: Resolved) -> None:
    """The default report: nobody listens."""


def _no_failpoint(name: str) -> None:
    """The background's resolutions pass no recovery failpoint."""


class Backlog:
    """Transactions of a running coordinator that its commit sequence could not finish.

    * deferred: COMMITTED, phase 2 unfinished (a participant failed): commit by xid, END;
    * missed rollbacks: aborted, a branch that may be prepared was unreachable: roll back;
    * in doubt: the commit point got no answer (the broker's COMMIT, or the commit of
      the branch carrying the decision row): settle that session, read the marker or
      the row, decide;
    * ended with a marker: done, the marker waits to be swept in a batch.

    Thread-safe; the watchdog calls :meth:`work` every housekeeping interval.
    """

    def __init__(
        self,
        resources: Mapping[str, XAResource],
        log: DecisionLog,
        broker: LastResource | None,
        *,
        marker_batch: int = 500,
        decision_holder: DecisionHolder | None = None,
        report: Callable[[Resolved], None] = _nothing_resolved,
    ) -> None:
        self._resources = resources
        self._log = log
        self._broker = broker
        self._holder = decision_holder
        self.marker_batch = marker_batch
        self._report = report
        self._lock = threading.Lock()
        self._deferred: list[Unfinished] = []
        self._missed_rollbacks: list[tuple[str, Xid, object]] = []
        # each with how to settle the session that carried its commit (LastResource.settle,
        # or DecisionHolder.settle)
        self._in_doubt: list[tuple[Unfinished, Callable[[float], None]]] = []
        self._ended_with_marker: set[str] = set()  # a set: holds() runs at every begin
        self._sweep_asked = False  # ended() asked for the sweep of the batch in hand

    # -- filled by the coordinator ---------------------------------------------------

    def defer(self, tx: Unfinished) -> None:
        """``tx`` is committed but some branch is still prepared."""
        with self._lock:
            self._deferred.append(tx)

    def missed_rollback(self, name: str, xid: Xid, *, lost_session: object = None) -> None:
        """An aborted branch may still be prepared in ``name``; ``lost_session``: its lost
        session, whose PREPARE may still run there, for the resource to end first
        (PostgreSQL's ``end_lost_session``; docs/design.md §2, "A PREPARE behind work
        that waits")."""
        with self._lock:
            self._missed_rollbacks.append((name, xid, lost_session))

    def doubt(self, tx: Unfinished, settle: Callable[[float], None]) -> None:
        """``tx``'s commit point got no answer; ``settle(timeout)`` fences the session that
        carried it."""
        with self._lock:
            self._in_doubt.append((tx, settle))

    def ended(self, gtrid: str) -> bool:
        """``gtrid`` ended and its marker may go; True when a batch is due: once per
        batch, so that the transactions ending before the sweep takes it do not ask
        for sweeps of their own (each one a flush of the log and a broker round)."""
        with self._lock:
            self._ended_with_marker.add(gtrid)
            due = len(self._ended_with_marker) >= self.marker_batch and not self._sweep_asked
            self._sweep_asked = self._sweep_asked or due
            return due

    def _ended_here(self, gtrid: str) -> None:
        """``gtrid``, resolved by the backlog, ended: its marker goes with the batch, swept
        when the coordinator's next ended() finds it due (the backlog asks for no sweep)."""
        with self._lock:
            self._ended_with_marker.add(gtrid)

    def holds(self, gtrid: str) -> bool:
        """True while ``gtrid`` may still have a marker on the queue (not reusable yet)."""
        with self._lock:
            return gtrid in self._ended_with_marker or any(
                tx.gtrid == gtrid for tx, _ in self._in_doubt
            )

    @property
    def in_doubt(self) -> list[str]:
        with self._lock:
            return [tx.gtrid for tx, _ in self._in_doubt]

    def forget_in_doubt(self) -> None:
        """A full recovery pass is about to fence and decide these too."""
        with self._lock:
            self._in_doubt.clear()

    # -- worked off in the background ------------------------------------------------

    def work(self, settle_timeout: float = 10.0) -> None:
        """One round of every chore."""
        self.retry_deferred()
        self.retry_rollbacks()
        self.resolve_in_doubt(settle_timeout)

    def retry_deferred(self) -> int:
        """Finish committed transactions whose phase 2 or log records are unfinished:
        the COMMIT record first if it is missing (never END without it), phase 2, END.
        Return how many are done."""
        with self._lock:
            pending, self._deferred = self._deferred, []
        if not pending:
            return 0
        try:
            logged = self._log.pending()
        except TwoPhaseCommitError as exc:  # the log cannot even be read: next round
            events.get_logger().warning(events.RECOVERY_RESOLVE_FAILED, error=str(exc))
            with self._lock:
                self._deferred.extend(pending)
            return 0
        done = 0
        for tx in pending:
            # A commit decided by the marker whose lazy record failed: resolve() writes
            # the record (forced) before END, and the marker decides until then. Any
            # other decision is already a record (forced) or a row.
            missing = tx.marker_sent and self._holder is None and tx.gtrid not in logged
            item = evidence(
                tx.gtrid,
                dict.fromkeys(tx.branches),
                logged_commit=not missing,
                markers={tx.gtrid} if missing else None,
            )
            if not self._resolve(item):
                self.defer(tx)
                continue
            if tx.marker_sent:
                self._ended_here(tx.gtrid)
            self._resolved(item, was=Outcome.COMMITTED)
            done += 1
        return done

    def retry_rollbacks(self) -> int:
        """Roll back, by xid, prepared branches of aborted transactions whose session died."""
        with self._lock:
            pending, self._missed_rollbacks = self._missed_rollbacks, []
        done = 0
        for name, xid, lost in pending:
            if lost is not None and not self._end_lost_session(name, xid, lost):
                self.missed_rollback(name, xid, lost_session=lost)
                continue
            item = evidence(xid.gtrid, {name: None}, logged_commit=False, markers=())
            if not self._resolve(item):
                self.missed_rollback(name, xid)
                continue
            done += 1
        return done

    def _end_lost_session(self, name: str, xid: Xid, session: object) -> bool:
        """End the lost ``session`` of ``xid``'s branch in ``name``, where its resource
        can (PostgreSQL's); False (logged) if it must wait for the next round."""
        ending = getattr(self._resources.get(name), "end_lost_session", None)
        if ending is None:
            return True
        try:
            ending(session, xid)
        except TwoPhaseCommitError as exc:
            events.get_logger(gtrid=xid.gtrid).warning(
                events.RECOVERY_RESOLVE_FAILED, decision=Decision.ROLLBACK.value, error=str(exc)
            )
            return False
        return True

    def resolve_in_doubt(self, timeout: float = 10.0) -> int:
        """Decide transactions whose commit point got no answer, by their marker or row.

        The session that carried the commit is fenced first (the broker session's
        client-id re-registered, or the database session that carried the decision
        row ended), so its COMMIT has been processed or discarded and the marker or
        row is final. Transactions that cannot be decided yet stay for the next attempt.
        """
        with self._lock:
            pending, self._in_doubt = self._in_doubt, []
        if not pending:
            return 0
        table = self._holder
        by_row = [tx for tx, _ in pending if tx.decision_carrier is not None]
        rows: set[str] = set()
        markers: set[str] = set()
        try:
            for _, settle in pending:
                settle(timeout)
            for tx in by_row:
                if table is None:
                    raise ConfigurationError("an in-doubt decision row needs the decision table")
                rows |= table.decided(tx.gtrid)
            if len(by_row) < len(pending):
                if self._broker is None:
                    raise ConfigurationError("an in-doubt marker commit needs the broker")
                markers = self._broker.markers()
        except Exception as exc:  # kept for the next round, whatever failed
            events.get_logger().warning(events.RECOVERY_RESOLVE_FAILED, error=str(exc))
            with self._lock:
                self._in_doubt.extend(pending)
            return 0
        resolved = 0
        for tx, settle in pending:
            row = tx.decision_carrier is not None
            item = evidence(
                tx.gtrid,
                {name: None for name in tx.branches if name != tx.decision_carrier},
                logged_commit=False,
                markers=None if row else markers,
                rows=rows if row else None,
            )
            if not self._resolve(item):
                self.doubt(tx, settle)
                continue
            if item.decision is Decision.COMMIT and not row:
                self._ended_here(tx.gtrid)
            self._resolved(item, was=Outcome.IN_DOUBT)
            resolved += 1
        return resolved

    def sweep_markers(self) -> int:
        """Remove the commit markers of transactions that ended (in batches)."""
        if self._broker is None:
            return 0
        with self._lock:
            batch, self._ended_with_marker = self._ended_with_marker, set()
            self._sweep_asked = False
        if not batch:
            return 0
        try:
            self._log.flush()  # the END records first: a marker may go only once END is durable
            removed = self._broker.remove_markers(batch)
        except TwoPhaseCommitError as exc:
            events.get_logger().warning(events.MARKERS_REMOVE_FAILED, error=str(exc))
            with self._lock:
                self._ended_with_marker.update(batch)
            return 0
        events.get_logger().debug(events.MARKERS_REMOVED, count=removed)
        return removed

    def _resolve(self, item: InDoubt) -> bool:
        """Resolve ``item``; False (logged) if it must wait for the next round.

        Any error keeps the item: a participant that is down, but also an
        unexpected one (a bug), which is logged with its traceback.
        """
        holder = self._broker.name if self._broker is not None and item.marker else None
        try:
            resolve(
                item,
                self._resources,
                self._log,
                marker_holder=holder,
                rows_decide=self._holder is not None,
                failpoint=_no_failpoint,
            )
        except Exception as exc:
            events.get_logger(gtrid=item.gtrid).warning(
                events.RECOVERY_RESOLVE_FAILED,
                decision=item.decision.value,
                error=str(exc) if isinstance(exc, TwoPhaseCommitError) else repr(exc),
                exc_info=not isinstance(exc, TwoPhaseCommitError),
            )
            return False
        return True

    def _resolved(self, item: InDoubt, *, was: Outcome) -> None:
        """Tell the listeners what became of ``item``'s gtrid."""
        outcome = Outcome.COMMITTED if item.decision is Decision.COMMIT else Outcome.ABORTED
        self._report(Resolved(item.gtrid, outcome, was, tuple(item.done)))
