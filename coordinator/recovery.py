"""Recovery: the log, the participants' prepared lists and the broker's markers -> decisions.

A scan in the manner of Narayana's recovery modules: gather every gtrid of
this coordinator that is logged as committed without END or prepared in some
database, fence the broker so its marker queue is final, decide each one
(presumed abort: COMMIT logged or marker present -> commit; otherwise roll
back), act, and record END. Idempotent; may itself crash at any step.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from coordinator import events, failpoints
from coordinator.errors import TwoPhaseCommitError
from coordinator.log import DecisionLog
from coordinator.protocol import LastResource, XAResource
from coordinator.xid import FORMAT_ID, Xid, gtrid_prefix


class Decision(enum.Enum):
    """What recovery does with one in-doubt gtrid."""

    COMMIT = "commit"
    ROLLBACK = "rollback"


def decide(logged_commit: bool, marker: bool) -> Decision:
    """Presumed abort: commit only what the log or the broker's marker says was decided."""
    return Decision.COMMIT if logged_commit or marker else Decision.ROLLBACK


@dataclass
class InDoubt:
    """One gtrid recovery found, what it knows of it and what it did."""

    gtrid: str
    logged_commit: bool
    prepared: dict[str, datetime | None] = field(default_factory=dict)  # where -> since
    marker: bool | None = None  # None: not read (every gtrid's COMMIT was logged)
    decision: Decision = Decision.ROLLBACK
    done: list[str] = field(default_factory=list)  # "a: committed", "b: already gone", ...
    error: str | None = None

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
            "decision": self.decision.value,
            "done": self.done,
            "error": self.error,
        }


@dataclass
class RecoveryReport:
    """What one recovery pass found and did."""

    items: list[InDoubt]
    fenced: bool
    seconds: float
    orphan_markers_removed: int = 0

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
    """One recovery pass over a coordinator's log, databases and broker."""

    def __init__(
        self,
        coordinator_id: str,
        log: DecisionLog | None,
        resources: Sequence[XAResource],
        broker: LastResource | None,
        *,
        pending: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.prefix = gtrid_prefix(coordinator_id)
        self.log = log
        self.pending = dict(log.pending() if pending is None and log is not None else pending or {})
        self.resources = {r.name: r for r in resources}
        self.broker = broker
        self.events = events.get_logger(component="recovery")

    def gather(self, *, fence: bool, fence_timeout: float = 30.0) -> tuple[list[InDoubt], bool]:
        """Everything in doubt, decided but not acted on; whether the broker was fenced."""
        items: dict[str, InDoubt] = {
            gtrid: InDoubt(gtrid, logged_commit=True) for gtrid in self.pending
        }
        for name, resource in self.resources.items():
            detailed = getattr(resource, "recover_detailed", None)
            found: list[tuple[Xid, datetime | None]] = (
                detailed(FORMAT_ID, self.prefix)
                if detailed is not None
                else [(x, None) for x in resource.recover(FORMAT_ID, self.prefix)]
            )
            for xid, since in found:
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
        for item in items.values():
            item.decision = decide(item.logged_commit, bool(item.marker))
            self.events.info(events.RECOVERY_FOUND, **item.as_dict())
        return sorted(items.values(), key=lambda i: i.gtrid), fenced

    def run(self, *, fence_timeout: float = 30.0) -> RecoveryReport:
        """Gather, decide and act; record END for what was committed."""
        if self.log is None:
            raise TwoPhaseCommitError("recovery needs the decision log (and its lock)")
        started = time.monotonic()
        self.events.info(events.RECOVERY_STARTED, logged=len(self.pending))
        items, fenced = self.gather(fence=True, fence_timeout=fence_timeout)
        failpoints.hit("recovery_after_gather")
        committed_with_marker: list[str] = []
        for item in items:
            try:
                self._resolve(item)
            except TwoPhaseCommitError as exc:
                item.error = str(exc)
                self.events.warning(events.RECOVERY_RESOLVED, gtrid=item.gtrid, error=str(exc))
                continue
            if item.decision is Decision.COMMIT and item.marker:
                committed_with_marker.append(item.gtrid)
        self.log.flush()
        orphans = self._remove_markers(committed_with_marker, items)
        report = RecoveryReport(items, fenced, time.monotonic() - started, orphans)
        self.events.info(
            events.RECOVERY_FINISHED,
            found=len(items),
            fenced=fenced,
            resolved=report.resolved,
            seconds=round(report.seconds, 3),
        )
        return report

    def _resolve(self, item: InDoubt) -> None:
        assert self.log is not None
        if item.decision is Decision.COMMIT:
            if not item.logged_commit:
                # Record the decision before acting: the marker may be swept later.
                self.log.log_commit(item.gtrid, sorted(item.prepared), force=True)
                item.logged_commit = True
            for name in sorted(item.prepared):
                found = self._resource(name, item).commit_recovered(Xid.branch(item.gtrid, name))
                item.done.append(f"{name}: {'committed' if found else 'already gone'}")
                failpoints.hit("recovery_after_resolve_one")
            self.log.log_end(item.gtrid)
        else:
            for name in sorted(item.prepared):
                found = self._resource(name, item).rollback_recovered(Xid.branch(item.gtrid, name))
                item.done.append(f"{name}: {'rolled back' if found else 'already gone'}")
                failpoints.hit("recovery_after_resolve_one")
        self.events.info(
            events.RECOVERY_RESOLVED, gtrid=item.gtrid, decision=item.decision.value, done=item.done
        )

    def _resource(self, name: str, item: InDoubt) -> XAResource:
        resource = self.resources.get(name)
        if resource is None:
            raise TwoPhaseCommitError(
                f"gtrid {item.gtrid} is prepared in participant {name!r}, which this "
                "coordinator was not given; configure it and run 'twopc recover' again"
            )
        return resource

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
