"""The crash torture's figures over all schedules: what the table and ``--json`` show."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scenarios.torture.results import ScheduleResult
from scenarios.transfer.results import percentiles


@dataclass(frozen=True)
class Row:
    """One line of the table: a label, its figure, and whether it is an invariant that failed."""

    key: str
    label: str
    value: Any
    failed: bool = False
    invariant: bool = False

    def shown(self) -> str:
        if isinstance(self.value, float):
            return f"{self.value:.3f}".rstrip("0").rstrip(".")
        if isinstance(self.value, dict):
            return ", ".join(f"{k}: {v}" for k, v in self.value.items()) or "-"
        return str(self.value)


def _p(values: list[float], q: str) -> float:
    return round(percentiles(values).get(q, 0.0), 3)


def rows(results: Sequence[ScheduleResult], seconds: float) -> list[Row]:
    """The figures, in the order the table prints them."""
    checks = [r.check for r in results]
    outcomes: Counter[str] = Counter()
    for r in results:
        outcomes.update(r.outcomes)
    armed = [r for r in results if r.schedule.failpoints]
    recovery_armed = [r for r in results if r.schedule.recovery_failpoints]
    passes = Counter(len(r.recovery.passes) for r in results)
    decisions: Counter[str] = Counter()
    for r in results:
        decisions.update(r.recovery.decisions.values())
    wall = [r.recovery.seconds for r in results]
    in_process = [r.recovery.in_process_seconds for r in results]
    batch = [float(r.notes.get("batch_seconds", 0.0)) for r in results]
    paused = [r for r in results if r.notes.get("paused_recovery") in ("refused", "ran")]
    partitioned = [r for r in results if "partition_recovery" in r.notes]
    kinds = Counter(r.schedule.fault.value for r in results)

    def total(attribute: str) -> int:
        return sum(len(getattr(c, attribute)) for c in checks)

    atomicity = total("atomicity_violations")
    conservation = sum(not c.money_conserved for c in checks)
    prepared = total("prepared_left")
    lost = total("lost_messages")
    dup_after = sum(c.duplicates_after_dedup for c in checks)
    not_durable = total("committed_not_durable")
    aborted_visible = total("aborted_but_visible")
    markers = sum(c.markers_left for c in checks)
    log_bad = sum(bool(c.log_pending or c.log_error) for c in checks)
    unresolved = sum(not r.recovery.resolved for r in results)
    hung = sum(r.hung for r in results)
    errors_to_callers = sum(len(r.errors) for r in results)
    died = sum(r.died_of_an_error + len(r.survivors_died) for r in results)
    paused_ran = sum(r.notes.get("paused_recovery") == "ran" for r in results)
    return [
        Row("schedules", "schedules run", len(results)),
        Row("faults", "faults", dict(sorted(kinds.items()))),
        Row(
            "failpoints_fired",
            "failpoints fired / armed: transfer",
            f"{sum(r.failpoint_fired for r in armed)} of {len(armed)}",
        ),
        Row(
            "recovery_failpoints_fired",
            "failpoints fired / armed: recovery",
            f"{sum(r.recovery.failpoint_fired for r in recovery_armed)} of {len(recovery_armed)}",
        ),
        Row("transfers", "outcomes told to callers", dict(sorted(outcomes.items()))),
        Row("atomicity_violations", "atomicity violations", atomicity, atomicity > 0, True),
        Row(
            "money_conservation_failures",
            "money-conservation failures",
            conservation,
            conservation > 0,
            True,
        ),
        Row("prepared_left", "prepared transactions left", prepared, prepared > 0, True),
        Row("lost_messages", "lost messages", lost, lost > 0, True),
        Row(
            "duplicates_before_dedup",
            "duplicates before dedup",
            sum(c.duplicates_before_dedup for c in checks),
        ),
        Row(
            "duplicates_after_dedup",
            "duplicates after dedup",
            dup_after,
            dup_after > 0,
            True,
        ),
        Row(
            "committed_not_durable",
            "told COMMITTED, not durable",
            not_durable,
            not_durable > 0,
            True,
        ),
        Row(
            "aborted_but_visible",
            "told ABORTED, but visible",
            aborted_visible,
            aborted_visible > 0,
            True,
        ),
        Row("markers_left", "orphan markers left", markers, markers > 0, True),
        Row(
            "log_not_clean",
            "log not reopening clean",
            log_bad,
            log_bad > 0,
            True,
        ),
        Row(
            "in_doubt_told",
            "told IN_DOUBT: committed / rolled back",
            f"{sum(c.in_doubt_committed for c in checks)} / "
            f"{sum(c.in_doubt_rolled_back for c in checks)}",
        ),
        Row(
            "in_doubt_resolved",
            "in doubt, resolved by recovery",
            dict(sorted(decisions.items())),
        ),
        Row("unresolved", "unresolved after all passes", unresolved, unresolved > 0, True),
        Row(
            "recovery_passes",
            "recovery passes (passes: runs)",
            dict(sorted(passes.items())),
        ),
        Row("recovery_p50", "recovery p50, s (with start-up)", _p(wall, "p50")),
        Row("recovery_p99", "recovery p99, s (with start-up)", _p(wall, "p99")),
        Row("recovery_in_process_p50", "recovery p50, s (in process)", _p(in_process, "p50")),
        Row("recovery_in_process_p99", "recovery p99, s (in process)", _p(in_process, "p99")),
        Row(
            "paused_recovery_refused",
            "recovery refused while paused",
            f"{sum(r.notes['paused_recovery'] == 'refused' for r in paused)} of {len(paused)}",
            paused_ran > 0,
            True,
        ),
        Row(
            "partition_recovery",
            "recovery in a partition: refused / ran",
            f"{sum(r.notes['partition_recovery'] == 'refused' for r in partitioned)} / "
            f"{sum(r.notes['partition_recovery'] == 'resolved' for r in partitioned)}",
        ),
        Row("hung", "batches that hung", hung, hung > 0, True),
        Row("batch_p50", "batch time p50, s", _p(batch, "p50")),
        Row("batch_max", "batch time max, s", _p(batch, "max")),
        Row(
            "errors_to_callers",
            "exceptions instead of an outcome",
            errors_to_callers,
            errors_to_callers > 0,
            True,
        ),
        Row("children_died", "children that died of an error", died, died > 0, True),
        Row("seconds", "torture time, s", round(seconds, 1)),
    ]


def summary(results: Sequence[ScheduleResult], seconds: float) -> dict[str, Any]:
    """The figures as a dict (``--json``), with the failing schedules and their problems."""
    table = rows(results, seconds)
    return {
        "ok": not any(row.failed for row in table) and all(r.ok for r in results),
        "figures": {row.key: row.value for row in table},
        "failed_schedules": [
            {"name": r.schedule.name, "describe": r.schedule.describe(), "problems": r.problems}
            for r in results
            if not r.ok
        ],
    }
