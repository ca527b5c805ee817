"""What the crash torture found: one schedule's result, and the recovery passes it took.

:class:`ScheduleResult` is what :class:`~scenarios.torture.runner.Torture` returns
for a schedule: how the child ended, the outcomes its callers were told, the
:class:`RecoveryRun` (each ``twopc recover`` pass), the ledger's
:class:`~scenarios.torture.ledger.Check`, and the problems all of these add up to.
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from scenarios.torture.ledger import Check
from scenarios.torture.schedules import Schedule

#: How a child ends when nothing went wrong with it: its batch finished (0), or the fault,
#: a failpoint or the torture killed it.
_ENDED = (0, -signal.SIGKILL)


@dataclass
class RecoveryPass:
    """One ``twopc recover`` process."""

    exit_code: int
    seconds: float  # wall clock, process start included
    report: dict[str, Any] | None  # its --json output, when it got that far
    error: str = ""

    @property
    def killed(self) -> bool:
        return self.exit_code == -signal.SIGKILL

    @property
    def resolved(self) -> bool:
        return self.exit_code == 0 and bool(self.report and self.report.get("resolved"))


@dataclass
class RecoveryRun:
    """The passes it took until everything was resolved."""

    passes: list[RecoveryPass] = field(default_factory=list)
    decisions: dict[str, str] = field(default_factory=dict)  # gtrid -> commit / rollback
    seconds: float = 0.0  # wall clock, from the first pass to the resolved one

    @property
    def resolved(self) -> bool:
        return bool(self.passes) and self.passes[-1].resolved

    @property
    def failpoint_fired(self) -> bool:
        return bool(self.passes) and self.passes[0].killed

    @property
    def in_process_seconds(self) -> float:
        """The recoveries' own figure: gather, fence, decide, act (no process start-up)."""
        return sum(float(p.report.get("seconds", 0.0)) for p in self.passes if p.report)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passes": len(self.passes),
            "resolved": self.resolved,
            "seconds": round(self.seconds, 3),
            "in_process_seconds": round(self.in_process_seconds, 3),
            "killed_passes": sum(p.killed for p in self.passes),
            "decisions": dict(Counter(self.decisions.values())),
            "errors": [p.error for p in self.passes if p.error],
        }


@dataclass
class ScheduleResult:
    """What one schedule did and what the check found."""

    schedule: Schedule
    exit_code: int | None
    killed_by_torture: bool
    hung: bool
    outcomes: Counter[str]
    errors: list[str]  # exceptions that reached a caller instead of an outcome
    recovery: RecoveryRun
    check: Check
    notes: dict[str, Any]
    seconds: float

    @property
    def failpoint_fired(self) -> bool:
        """The child died by SIGKILL that the torture did not send: an armed failpoint."""
        return self.exit_code == -signal.SIGKILL and not self.killed_by_torture

    @property
    def died_of_an_error(self) -> bool:
        """The child neither finished its batch (exit 0) nor was killed (SIGKILL)."""
        return self.exit_code not in _ENDED

    @property
    def survivors_died(self) -> list[int]:
        """The exit codes of the other coordinators' children (several coordinators) that
        died of an error: the fault never hits them, so they finish or are killed as hung."""
        return [code for code in self.notes.get("survivors_exit", []) if code not in _ENDED]

    @property
    def problems(self) -> list[str]:
        found = list(self.check.problems())
        if not self.recovery.resolved:
            last = self.recovery.passes[-1].error if self.recovery.passes else ""
            found.append(
                f"recovery did not resolve everything in {len(self.recovery.passes)} passes"
                + (f": {last}" if last else "")
            )
        if self.errors:
            found.append(
                f"{len(self.errors)} caller(s) got an exception instead of an outcome "
                f"(the first: {self.errors[0]})"
            )
        if self.died_of_an_error:
            stderr = str(self.notes.get("child_stderr", "")).strip().splitlines()
            found.append(
                f"the child exited with {self.exit_code}, neither finished nor killed"
                + (f" (its last line: {stderr[-1].strip()})" if stderr else "")
            )
        if self.survivors_died:
            found.append(
                f"other coordinators' children exited with {self.survivors_died}, neither "
                "finished nor killed (their stderr is the schedule's)"
            )
        if self.hung:
            found.append("the batch did not finish in time after every fault had healed")
        if self.notes.get("paused_recovery") == "ran":
            found.append("recovery ran while the coordinator was paused (its log lock is held)")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.as_dict(),
            "describe": self.schedule.describe(),
            "exit_code": self.exit_code,
            "failpoint_fired": self.failpoint_fired,
            "hung": self.hung,
            "outcomes": dict(self.outcomes),
            "errors": self.errors[:5],
            "recovery": self.recovery.as_dict(),
            "check": self.check.as_dict(),
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "problems": self.problems,
            "ok": self.ok,
        }
