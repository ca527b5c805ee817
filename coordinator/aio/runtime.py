"""What the commit sequence runs on: its configuration, parallel calls and log writes.

The source of :mod:`coordinator.runtime` (``scripts/unasync.py``). What differs
between tasks and threads is in :mod:`coordinator.compat`: parallel calls are
tasks gathered here and the executor's threads there; the decision log is
synchronous (a file and fsync), so under asyncio its writes run in a worker
thread and a forced write does not stop the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from coordinator.aio.transaction import AsyncTransaction
from coordinator.compat import ain_worker, arun_each, arun_parallel
from coordinator.log import DecisionLog
from coordinator.protocol import DecisionHolder

T = TypeVar("T")


@dataclass
class AsyncDriverConfig:
    """What the commit sequence needs from its coordinator."""

    log: DecisionLog
    # The coordinator's worker threads: parallel calls (threads) or log writes (asyncio).
    executor: Executor
    failpoint: Callable[[str], None]
    receipt_timeout: float = 5.0
    phase2_attempts: int = 3
    phase2_backoff: float = 0.05
    defer: Callable[[AsyncTransaction], None] = lambda tx: None  # phase 2 left for later
    # The participant that holds the decisions as rows, if the coordinator was given one
    # (docs/design.md §3): without a broker writer, its branch carries the decision row.
    decision_holder: DecisionHolder | None = None
    # Whether this coordinator may reach a commit point now: False once it lost its
    # liveness lock (docs/design.md §4: a peer may be fencing it). Asked right before each one.
    may_decide: Callable[[], bool] = lambda: True

    async def run_parallel(
        self, calls: Sequence[Callable[[], Awaitable[T]]]
    ) -> list[T | BaseException]:
        """Run ``calls`` at once; return results or exceptions."""
        return await arun_parallel(self.executor, calls)

    async def run_each(
        self, calls: Sequence[Callable[[], Awaitable[T]]]
    ) -> list[T | BaseException]:
        """Wait for each branch's answer (the driver sent every branch its command first)."""
        return await arun_each(self.executor, calls)

    async def log_commit(self, gtrid: str, participants: Sequence[str], *, force: bool) -> None:
        """Write the COMMIT record (forced: durable on return, in a worker thread; lazy:
        in place, see :meth:`log_end`)."""
        if not force:
            self.log.log_commit(gtrid, participants, force=False)
            return
        await ain_worker(
            self.executor, lambda: self.log.log_commit(gtrid, participants, force=True)
        )

    async def log_end(self, gtrid: str) -> None:
        """Write the END record (lazily), in place: a lazy record is one write to the page
        cache, cheaper than the hop to a worker thread and back (docs/design.md §2)."""
        self.log.log_end(gtrid)
