"""Recovery: every unresolved gtrid, from what is known of it, to one decision and its acts.

One rule decides (:func:`decide`, presumed abort: COMMIT logged, marker
present or decision row present -> commit; otherwise roll back) and one function acts on a decision
(:func:`resolve`). Everything that resolves a transaction goes through them:

* :class:`Recovery` -- the full scan, in the manner of Narayana's recovery
  modules: gather every gtrid of this coordinator that is logged as committed
  without END or prepared in some database, fence the broker so its marker
  queue is final, decide, act, record END. It runs at start-up and for
  ``twopc recover``; ``twopc indoubt`` runs the same scan as a dry run, over a
  log read without its lock and without fencing.
* :class:`Backlog` -- what a running coordinator's commit sequence could not
  finish: a deferred phase 2, a rollback that missed a prepared branch, a
  commit point with no answer. The watchdog works it off in the background.

Idempotent; may itself crash at any step (failpoints ``recovery_*``).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from coordinator import events, failpoints
from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from coordinator.log import DecisionLog, DecisionTable, commit_record_participants
from coordinator.protocol import LastResource, XAResource
from coordinator.states import TxState
from coordinator.xid import FORMAT_ID, Xid, gtrid_prefix


class Decision(enum.Enum):
    """What recovery does with one in-doubt gtrid."""

    COMMIT = "commit"
    ROLLBACK = "rollback"


def decide(logged_commit: bool, marker: bool, decision_row: bool = False) -> Decision:
    """Presumed abort: commit only what the log, the broker's marker or the decision row
    in the commit-markable participant says was decided.

    A marker or a row counts only once its writer was fenced (its commit may be in
    flight until then): the callers read them after fencing, never before.
    """
    return Decision.COMMIT if logged_commit or marker or decision_row else Decision.ROLLBACK


@dataclass
class InDoubt:
    """One unresolved gtrid: what is known of it, the decision and what was done."""

    gtrid: str
    logged_commit: bool
    prepared: dict[str, datetime | None] = field(default_factory=dict)  # where -> since
    marker: bool | None = None  # None: not read (every gtrid's COMMIT was logged)
    decision_row: bool | None = None  # None: not read (no decision table, or logged)
    decision: Decision = Decision.ROLLBACK
    done: list[str] = field(default_factory=list)  # "a: committed", "b: already gone", ...
    error: str | None = None

    def decided(self) -> InDoubt:
        """Set :attr:`decision` from what is known; return self."""
        self.decision = decide(self.logged_commit, bool(self.marker), bool(self.decision_row))
        return self

    def age_seconds(self, now: datetime | None = None) -> float | None:
        stamps = [t for t in self.prepared.values() if t is not None]
        if not stamps:
            return None
        now = now or datetime.now(UTC)
        return max(0.0, (now - min(stamps)).total_seconds())

    def as_dict(self) -> dict[str, Any]:
        age = self.age_seconds()
        return {
            "gtrid": self.gtrid,
            "age_seconds": None if age is None else round(age, 3),
            "prepared_in": sorted(self.prepared),
            "logged_commit": self.logged_commit,
            "marker": self.marker,
            "decision_row": self.decision_row,
            "decision": self.decision.value,
            "done": self.done,
            "error": self.error,
        }


def resolve(
    item: InDoubt,
    resources: Mapping[str, XAResource],
    log: DecisionLog,
    *,
    marker_holder: str | None,
    failpoint: Callable[[str], None] = failpoints.hit,
) -> None:
    """Act on ``item.decision``: COMMIT or ROLLBACK PREPARED every branch, by xid.

    A commit decided by a marker is logged (forced) before anything is acted
    on, since the marker may be swept later; END follows the last commit. A log
    that keeps no records (its decisions are rows, :attr:`DecisionLog.table`)
    logs nothing: the marker or the row stays until END.
    Raises TwoPhaseCommitError (naming participant and gtrid) when a branch
    cannot be resolved now; a later pass finishes it.
    """
    names = sorted(item.prepared)
    for name in names:
        if name not in resources:
            raise ConfigurationError(
                f"gtrid {item.gtrid} is prepared in participant {name!r}, which this "
                "coordinator was not given; configure it and run 'twopc recover' again"
            )
    if item.decision is Decision.COMMIT:
        if not item.logged_commit and log.table is None:
            participants = commit_record_participants(names, marker_holder)
            log.log_commit(item.gtrid, participants, force=True)
            item.logged_commit = True
        for name in names:
            found = resources[name].commit_recovered(Xid.branch(item.gtrid, name))
            item.done.append(f"{name}: {'committed' if found else 'already gone'}")
            failpoint("recovery_after_resolve_one")
        log.log_end(item.gtrid)
    else:
        for name in names:
            found = resources[name].rollback_recovered(Xid.branch(item.gtrid, name))
            item.done.append(f"{name}: {'rolled back' if found else 'already gone'}")
            failpoint("recovery_after_resolve_one")
    events.get_logger(gtrid=item.gtrid).info(
        events.RECOVERY_RESOLVED, decision=item.decision.value, done=item.done
    )


def _no_failpoint(name: str) -> None:
    """The background's resolutions pass no recovery failpoint."""


# -- the full scan --------------------------------------------------------------------


@dataclass
class RecoveryReport:
    """What one recovery pass found and did."""

    items: list[InDoubt]
    fenced: bool
    seconds: float
    orphan_markers_removed: int = 0
    dry_run: bool = False

    @property
    def resolved(self) -> bool:
        return all(item.error is None for item in self.items)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fenced": self.fenced,
            "seconds": round(self.seconds, 3),
            "resolved": self.resolved,
            "orphan_markers_removed": self.orphan_markers_removed,
            "transactions": [item.as_dict() for item in self.items],
        }


class Recovery:
    """One recovery pass over a coordinator's log, databases and broker.

    ``pending`` is the log's COMMIT-without-END set; by default it is read
    from ``log``. A dry run (``log=None``, for ``twopc indoubt``) needs it given.
    """

    def __init__(
        self,
        coordinator_id: str,
        log: DecisionLog | None,
        resources: Sequence[XAResource],
        broker: LastResource | None,
        *,
        pending: Mapping[str, tuple[str, ...]] | None = None,
        table: DecisionTable | None = None,
    ) -> None:
        self.prefix = gtrid_prefix(coordinator_id)
        self.log = log
        # Where decision rows are (docs/design.md §5): read after fencing, like the markers.
        self.table = table if table is not None or log is None else log.table
        if pending is None:
            pending = log.pending() if log is not None else {}
        self.pending = dict(pending)
        self.resources = {r.name: r for r in resources}
        self.broker = broker
        self.events = events.get_logger(component="recovery")

    def gather(self, *, fence: bool, fence_timeout: float = 30.0) -> tuple[list[InDoubt], bool]:
        """Everything in doubt, decided but not acted on; whether the broker was fenced."""
        items: dict[str, InDoubt] = {
            gtrid: InDoubt(gtrid, logged_commit=True) for gtrid in self.pending
        }
        for name, resource in self.resources.items():
            for xid, since in resource.recover(FORMAT_ID, self.prefix).items():
                item = items.setdefault(xid.gtrid, InDoubt(xid.gtrid, logged_commit=False))
                item.prepared[name] = since
        fenced = False
        if self.broker is not None and any(not i.logged_commit for i in items.values()):
            if fence:
                self.broker.fence(fence_timeout)
                fenced = True
                self.events.info(events.RECOVERY_FENCED, participant=self.broker.name)
            markers = self.broker.markers()
            for item in items.values():
                item.marker = item.gtrid in markers
        if self.table is not None and any(not i.logged_commit for i in items.values()):
            rows = self.table.decided(self.prefix)
            for item in items.values():
                item.decision_row = item.gtrid in rows
        for item in items.values():
            self.events.info(events.RECOVERY_FOUND, **item.decided().as_dict())
        return sorted(items.values(), key=lambda i: i.gtrid), fenced

    def run(self, *, fence_timeout: float = 30.0, dry_run: bool = False) -> RecoveryReport:
        """Gather, decide and act; record END for what was committed.

        With ``dry_run`` nothing is fenced or changed: the report says what a
        real pass would decide (a live coordinator may still commit meanwhile).
        """
        started = time.monotonic()
        self.events.info(events.RECOVERY_STARTED, logged=len(self.pending), dry_run=dry_run)
        if dry_run:
            items, _ = self.gather(fence=False)
            return RecoveryReport(items, False, time.monotonic() - started, dry_run=True)
        log = self.log
        if log is None:
            raise ConfigurationError("recovery needs the decision log (and its lock)")
        items, fenced = self.gather(fence=True, fence_timeout=fence_timeout)
        failpoints.hit("recovery_after_gather")
        committed_with_marker: list[str] = []
        for item in items:
            holder = self.broker.name if self.broker is not None and item.marker else None
            try:
                resolve(item, self.resources, log, marker_holder=holder)
            except TwoPhaseCommitError as exc:
                item.error = str(exc)
                self.events.warning(
                    events.RECOVERY_RESOLVE_FAILED, gtrid=item.gtrid, error=str(exc)
                )
                continue
            if item.decision is Decision.COMMIT and item.marker:
                committed_with_marker.append(item.gtrid)
        log.flush()
        orphans = self._remove_markers(committed_with_marker, items)
        self._remove_rows(items)
        report = RecoveryReport(items, fenced, time.monotonic() - started, orphans)
        self.events.info(
            events.RECOVERY_FINISHED,
            found=len(items),
            fenced=fenced,
            resolved=report.resolved,
            seconds=round(report.seconds, 3),
        )
        return report

    def _remove_rows(self, items: list[InDoubt]) -> int:
        """Decision rows of this coordinator whose transactions are resolved: every branch
        of a gtrid with a row was prepared before the row committed, and none is left."""
        if self.table is None:
            return 0
        open_gtrids = {i.gtrid for i in items if i.error is not None}
        stale = self.table.decided(self.prefix) - open_gtrids
        if not stale:
            return 0
        removed = self.table.forget(stale)
        self.events.info(events.DECISION_ROWS_REMOVED, count=removed)
        return removed

    def _remove_markers(self, committed: list[str], items: list[InDoubt]) -> int:
        """Markers of what was just resolved, and orphans of transactions long ended."""
        if self.broker is None:
            return 0
        open_gtrids = {i.gtrid for i in items if i.error is not None}
        stale = {g for g in self.broker.markers() if g.startswith(self.prefix)}
        stale -= open_gtrids
        stale |= set(committed)
        if not stale:
            return 0
        removed = self.broker.remove_markers(stale)
        self.events.info(events.MARKERS_REMOVED, count=removed)
        return removed


# -- what a running coordinator left behind -------------------------------------------------


class Unfinished(Protocol):
    """What the backlog needs of a transaction (sync or asyncio) it finishes."""

    @property
    def gtrid(self) -> str: ...

    @property
    def branches(self) -> Mapping[str, object]: ...

    @property
    def marker_sent(self) -> bool: ...

    @property
    def reason(self) -> str: ...

    def move(self, target: TxState) -> None: ...

    def decided(self, *, by_marker: bool) -> None: ...

    def abandon_because(self, reason: str) -> None: ...

    @property
    def decision_holder(self) -> str | None: ...


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
    ) -> None:
        self._resources = resources
        self._log = log
        self._broker = broker
        self.marker_batch = marker_batch
        self._lock = threading.Lock()
        self._deferred: list[Unfinished] = []
        self._missed_rollbacks: list[tuple[str, Xid]] = []
        # each with how to settle the session that carried its commit (LastResource.settle,
        # or DecisionTable.settle)
        self._in_doubt: list[tuple[Unfinished, Callable[[float], None]]] = []
        self._ended_with_marker: set[str] = set()  # a set: holds() runs at every begin

    # -- filled by the coordinator ---------------------------------------------------

    def defer(self, tx: Unfinished) -> None:
        """``tx`` is committed but some branch is still prepared."""
        with self._lock:
            self._deferred.append(tx)

    def missed_rollback(self, name: str, xid: Xid) -> None:
        """An aborted branch may still be prepared in ``name``."""
        with self._lock:
            self._missed_rollbacks.append((name, xid))

    def doubt(self, tx: Unfinished, settle: Callable[[float], None]) -> None:
        """``tx``'s commit point got no answer; ``settle(timeout)`` fences its broker session."""
        with self._lock:
            self._in_doubt.append((tx, settle))

    def ended(self, gtrid: str) -> bool:
        """``gtrid`` ended and its marker may go; True when a batch is due."""
        with self._lock:
            self._ended_with_marker.add(gtrid)
            return len(self._ended_with_marker) >= self.marker_batch

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
            missing = tx.marker_sent and self._log.table is None and tx.gtrid not in logged
            item = InDoubt(
                tx.gtrid,
                logged_commit=not missing,
                prepared=dict.fromkeys(tx.branches),
                marker=True if missing else None,
            )
            if not self._resolve(item.decided()):
                self.defer(tx)
                continue
            tx.move(TxState.COMPLETED)
            if tx.marker_sent:
                self.ended(tx.gtrid)
            done += 1
        return done

    def retry_rollbacks(self) -> int:
        """Roll back, by xid, prepared branches of aborted transactions whose session died."""
        with self._lock:
            pending, self._missed_rollbacks = self._missed_rollbacks, []
        done = 0
        for name, xid in pending:
            item = InDoubt(xid.gtrid, logged_commit=False, prepared={name: None}, marker=False)
            if not self._resolve(item.decided()):
                self.missed_rollback(name, xid)
                continue
            done += 1
        return done

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
        table = self._log.table
        by_row = [(tx, settle) for tx, settle in pending if tx.decision_holder is not None]
        by_marker = [(tx, settle) for tx, settle in pending if tx.decision_holder is None]
        rows: set[str] = set()
        markers: set[str] = set()
        try:
            for _, settle in pending:
                settle(timeout)
            for tx, _ in by_row:
                assert table is not None
                rows |= table.decided(tx.gtrid)
            if by_marker:
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
            row = tx.decision_holder is not None
            item = InDoubt(
                tx.gtrid,
                logged_commit=False,
                prepared={name: None for name in tx.branches if name != tx.decision_holder},
                marker=None if row else tx.gtrid in markers,
                decision_row=tx.gtrid in rows if row else None,
            )
            if not self._resolve(item.decided()):
                self.doubt(tx, settle)
                continue
            if item.decision is Decision.COMMIT:
                tx.decided(by_marker=not row)
                tx.move(TxState.COMPLETED)
                if not row:
                    self.ended(tx.gtrid)
            else:
                tx.abandon_because(tx.reason)
                tx.move(TxState.ABORTED)
            resolved += 1
        return resolved

    def sweep_markers(self) -> int:
        """Remove the commit markers of transactions that ended (in batches)."""
        if self._broker is None:
            return 0
        with self._lock:
            batch, self._ended_with_marker = self._ended_with_marker, set()
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
            resolve(item, self._resources, self._log, marker_holder=holder, failpoint=_no_failpoint)
        except Exception as exc:
            events.get_logger(gtrid=item.gtrid).warning(
                events.RECOVERY_RESOLVE_FAILED,
                decision=item.decision.value,
                error=str(exc) if isinstance(exc, TwoPhaseCommitError) else repr(exc),
                exc_info=not isinstance(exc, TwoPhaseCommitError),
            )
            return False
        return True
