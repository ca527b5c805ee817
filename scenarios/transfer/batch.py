"""Running a batch of transfers on threads: outcomes, client-visible latencies, percentiles."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import TwoPhaseCommitError
from coordinator.states import Outcome
from scenarios.transfer.model import Transfer


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


def run_batch(
    transfers: Sequence[Transfer],
    run_one: Callable[[Transfer], tuple[Outcome, str]],
    *,
    concurrency: int,
    on_done: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> BatchResult:
    """Run ``transfers`` on ``concurrency`` threads; collect outcomes and latencies.

    ``run_one`` returns an outcome; if it raises instead, the other threads finish
    the transfer in hand and take no more, and BatchFailed names the transfer.
    Once ``stop`` is set the threads likewise finish the transfer in hand (it
    commits or rolls back) and take no more; ``not_started`` counts the rest.
    """
    result = BatchResult()
    lock = threading.Lock()
    cursor = iter(transfers)
    started_count = 0
    failures: list[BatchFailed] = []

    def worker() -> None:
        nonlocal started_count
        while True:
            with lock:
                stopped = bool(failures) or (stop is not None and stop.is_set())
                transfer = None if stopped else next(cursor, None)
                started_count += transfer is not None
            if transfer is None:
                return
            start = time.perf_counter()
            try:
                outcome, reason = run_one(transfer)
            except Exception as exc:  # raised in the caller's thread, not lost with this one
                error = " ".join(f"{type(exc).__name__}: {exc}".split())
                failed = BatchFailed(
                    f"transfer {transfer.transfer_id} raised {error}",
                    transfer_id=transfer.transfer_id,
                )
                failed.__cause__ = exc
                with lock:
                    failures.append(failed)
                return
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                result.outcomes[outcome.value] += 1
                if outcome is Outcome.COMMITTED:
                    result.latencies_ms.append(elapsed)
                elif reason:
                    result.reasons[reason_key(reason, transfer.transfer_id)] += 1
            if on_done is not None:
                on_done()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"transfer-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    result.not_started = len(transfers) - started_count
    if failures:
        failures[0].result = result
        raise failures[0]
    return result
