"""Running a batch of transfers: a number of workers at once, each taking the next transfer.

Written once, for asyncio (``scenarios/transfer/batch_aio.py``: the workers are
tasks), from which ``scripts/unasync.py`` generates the thread version
(``scenarios/transfer/batch.py``: the workers are threads). ``twopc transfer``
runs one or the other (``--api``), and so does the crash torture's child.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence

from coordinator.compat import ALock, ajoin, aspawn
from coordinator.states import Outcome
from scenarios.transfer.model import Transfer
from scenarios.transfer.results import BatchFailed, BatchResult, reason_key


async def run_batch(
    transfers: Sequence[Transfer],
    run_one: Callable[[Transfer], Awaitable[tuple[Outcome, str]]],
    *,
    concurrency: int,
    on_done: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> BatchResult:
    """Run ``transfers``, ``concurrency`` at a time; collect outcomes and latencies.

    ``run_one`` returns an outcome; if it raises instead, the other workers finish
    the transfer in hand and take no more, and BatchFailed names the transfer.
    Once ``stop`` is set the workers likewise finish the transfer in hand (it
    commits or rolls back) and take no more; ``not_started`` counts the rest.
    """
    result = BatchResult()
    lock = ALock()
    cursor = iter(transfers)
    started_count = 0
    failures: list[BatchFailed] = []

    async def worker() -> None:
        nonlocal started_count
        while True:
            async with lock:
                stopped = bool(failures) or (stop is not None and stop.is_set())
                transfer = None if stopped else next(cursor, None)
                started_count += transfer is not None
            if transfer is None:
                return
            start = time.perf_counter()
            try:
                outcome, reason = await run_one(transfer)
            except Exception as exc:  # raised in the caller's worker, not lost with this one
                error = " ".join(f"{type(exc).__name__}: {exc}".split())
                failed = BatchFailed(
                    f"transfer {transfer.transfer_id} raised {error}",
                    transfer_id=transfer.transfer_id,
                )
                failed.__cause__ = exc
                async with lock:
                    failures.append(failed)
                return
            elapsed = (time.perf_counter() - start) * 1000
            async with lock:
                result.outcomes[outcome.value] += 1
                if outcome is Outcome.COMMITTED:
                    result.latencies_ms.append(elapsed)
                elif reason:
                    result.reasons[reason_key(reason, transfer.transfer_id)] += 1
            if on_done is not None:
                on_done()

    started = time.perf_counter()
    workers = [aspawn(worker, f"transfer-{i}") for i in range(concurrency)]
    for each in workers:
        await ajoin(each)
    result.seconds = time.perf_counter() - started
    result.not_started = len(transfers) - started_count
    if failures:
        failures[0].result = result
        raise failures[0]
    return result
