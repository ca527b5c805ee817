"""What a batch of transfers did: outcomes, client-visible latencies, abort reasons, percentiles.

The batch itself runs in :mod:`scenarios.transfer.batch` (threads) or
:mod:`scenarios.transfer.batch_aio` (asyncio tasks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import TwoPhaseCommitError


class BatchFailed(TwoPhaseCommitError):
    """A transfer of the batch raised instead of returning an outcome; the batch stopped.

    ``result`` holds what the batch did until then (for its summary).
    """

    result: BatchResult | None = None

    def __init__(self, message: str, *, transfer_id: str = "") -> None:
        super().__init__(message)
        self.transfer_id = transfer_id


@dataclass
class BatchResult:
    """Outcomes and client-visible latencies of one batch."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # committed transfers only
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    not_started: int = 0  # transfers left when the run was stopped

    def percentiles(self) -> dict[str, float]:
        return percentiles(self.latencies_ms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "committed": self.outcomes["committed"],
            "aborted": self.outcomes["aborted"],
            "in_doubt": self.outcomes["in-doubt"],
            "heuristic_mixed": self.outcomes["heuristic-mixed"],
            "seconds": round(self.seconds, 3),
            "throughput_per_s": round(self.outcomes["committed"] / self.seconds, 1)
            if self.seconds
            else 0.0,
            "latency_ms": self.percentiles(),
            "abort_reasons": dict(self.reasons.most_common(5)),
            "not_started": self.not_started,
        }


def reason_key(reason: str, transfer_id: str) -> str:
    """How an abort reason is counted: its first line (PostgreSQL's DETAIL, which quotes
    the row, is left out) without the transfer's own id, so that the transfers refused
    for one cause count together, and the cause (a participant's vote, the error its
    work met) still shows."""
    first = reason.strip().splitlines()[0] if reason.strip() else reason
    return first.replace(transfer_id, "…")[:160]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of ``values`` (nearest rank)."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p99.9": rank(0.999),
        "max": ordered[-1],
    }
