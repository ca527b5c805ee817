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
* :class:`~coordinator.backlog.Backlog` -- what a running coordinator's commit
  sequence could not finish: a deferred phase 2, a rollback that missed a
  prepared branch, a commit point with no answer. The watchdog works it off in
  the background.

What is known of one gtrid becomes an :class:`InDoubt` in one place,
:func:`evidence`.

Idempotent; may itself crash at any step (failpoints ``recovery_*``).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from coordinator import events, failpoints
from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from coordinator.log import DecisionLog, commit_record_participants
from coordinator.protocol import DecisionHolder, LastResource, XAResource
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


def evidence(
    gtrid: str,
    prepared: Mapping[str, datetime | None],
    *,
    logged_commit: bool,
    markers: Collection[str] | None = None,
    rows: Collection[str] | None = None,
) -> InDoubt:
    """Everything known of ``gtrid``, decided: the one place an :class:`InDoubt` is made.

    ``prepared``: where it is (or may be) prepared, and since when; ``logged_commit``:
    the log holds its COMMIT; ``markers`` / ``rows``: the broker's markers and the
    decision rows, read after fencing, or None when they were not read.
    """
    return InDoubt(
        gtrid,
        logged_commit=logged_commit,
        prepared=dict(prepared),
        marker=None if markers is None else gtrid in markers,
        decision_row=None if rows is None else gtrid in rows,
    ).decided()


def resolve(
    item: InDoubt,
    resources: Mapping[str, XAResource],
    log: DecisionLog,
    *,
    marker_holder: str | None,
    rows_decide: bool = False,
    failpoint: Callable[[str], None] = failpoints.hit,
) -> None:
    """Act on ``item.decision``: COMMIT or ROLLBACK PREPARED every branch, by xid.

    A commit decided by a marker is logged (forced) before anything is acted
    on, since the marker may be swept later; END follows the last commit. When
    the decisions are rows (``rows_decide``: the coordinator has a decision holder,
    and its log keeps no records) nothing is logged: the marker or the row stays
    until END.
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
        if not item.logged_commit and not rows_decide:
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
        decision_holder: DecisionHolder | None = None,
    ) -> None:
        self.coordinator_id = coordinator_id
        self.prefix = gtrid_prefix(coordinator_id)
        self.log = log
        # Where decision rows are (docs/design.md §5): read after fencing, like the markers.
        self.table = decision_holder
        if pending is None:
            pending = log.pending() if log is not None else {}
        self.pending = dict(pending)
        self.resources = {r.name: r for r in resources}
        self.broker = broker
        self.events = events.get_logger(component="recovery")

    def gather(self, *, fence: bool, fence_timeout: float = 30.0) -> tuple[list[InDoubt], bool]:
        """Everything in doubt, decided but not acted on; whether the broker was fenced.

        With ``fence``, the coordinator's busy database sessions are ended first
        (:meth:`end_busy_sessions`), so that nothing a dead process of it sent can be
        prepared after the listing."""
        if fence:
            self.end_busy_sessions(fence_timeout)
        prepared: dict[str, dict[str, datetime | None]] = {g: {} for g in self.pending}
        for name, resource in self.resources.items():
            for xid, since in resource.recover(FORMAT_ID, self.prefix).items():
                prepared.setdefault(xid.gtrid, {})[name] = since
        unlogged = any(gtrid not in self.pending for gtrid in prepared)
        fenced = False
        markers: set[str] | None = None
        rows: set[str] | None = None
        if self.broker is not None and unlogged:
            if fence:
                self.broker.fence(fence_timeout)
                fenced = True
                self.events.info(events.RECOVERY_FENCED, participant=self.broker.name)
            markers = self.broker.markers()
        if self.table is not None and unlogged:
            rows = self.table.decided(self.prefix)
        items = [
            evidence(
                gtrid,
                where,
                logged_commit=gtrid in self.pending,
                markers=markers,
                rows=rows,
            )
            for gtrid, where in sorted(prepared.items())
        ]
        for item in items:
            self.events.info(events.RECOVERY_FOUND, **item.as_dict())
        return items, fenced

    def end_busy_sessions(self, timeout: float) -> None:
        """End the sessions named by this coordinator's id that are busy on each database
        whose resource can (``end_sessions_named``: PostgreSQL's), before the listing.

        A process of this coordinator that died may have left work running in a
        database: waiting for a row lock, with its PREPARE sent behind it in one
        pipeline, it is prepared once the lock is freed, after the listing. Its
        sessions carry the coordinator's id as their ``application_name`` (a resource
        given one); this process's own are idle while it recovers (docs/design.md §5,
        "Work a dead process left running")."""
        deadline = time.monotonic() + timeout
        for name, resource in self.resources.items():
            ending = getattr(resource, "end_sessions_named", None)
            if ending is None:
                continue
            ended = ending(self.coordinator_id, deadline, busy_only=True)
            if ended:
                self.events.info(events.RECOVERY_SESSIONS_ENDED, participant=name, sessions=ended)

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
                resolve(
                    item,
                    self.resources,
                    log,
                    marker_holder=holder,
                    rows_decide=self.table is not None,
                )
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
