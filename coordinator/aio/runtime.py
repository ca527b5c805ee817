"""What the asyncio commit sequence runs on: its configuration and parallel calls as tasks.

The counterpart of :mod:`coordinator.runtime`, under the same names. The
decision log is synchronous (a file and fsync): its writes run in a worker
thread, so that a forced write does not stop the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from coordinator.aio.transaction import AsyncTransaction
from coordinator.errors import CrashInjected
from coordinator.log import DecisionLog
from coordinator.protocol import DecisionHolder

T = TypeVar("T")


@dataclass
class AsyncDriverConfig:
    """What the asyncio commit sequence needs from its coordinator."""

    log: DecisionLog
    # The coordinator's worker threads: the decision log's writes run on them.
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
        """Run ``calls`` at once as tasks; return results or exceptions."""
        return await run_parallel(calls)

    async def run_each(
        self, calls: Sequence[Callable[[], Awaitable[T]]]
    ) -> list[T | BaseException]:
        """Wait for each branch's answer: as tasks, at once (one thread either way)."""
        return await run_each(calls)

    async def log_commit(self, gtrid: str, participants: Sequence[str], *, force: bool) -> None:
        """Write the COMMIT record in a worker thread (forced: durable on return)."""
        await self._in_worker(lambda: self.log.log_commit(gtrid, participants, force=force))

    async def log_end(self, gtrid: str) -> None:
        """Write the END record in a worker thread (lazily)."""
        await self._in_worker(lambda: self.log.log_end(gtrid))

    async def _in_worker(self, call: Callable[[], None]) -> None:
        """``call`` on one of the executor's threads in a copy of this context (so the
        gtrid stays bound), or on the loop's default one once the executor is shut down
        (a closed coordinator)."""
        context = contextvars.copy_context()
        try:
            future = self.executor.submit(context.run, call)
        except RuntimeError:
            await asyncio.to_thread(call)
            return
        await asyncio.wrap_future(future)


async def run_parallel(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T | BaseException]:
    """Await ``calls`` concurrently (each task copies this context, so the gtrid stays
    bound); return results or exceptions, re-raising an injected crash."""
    results: list[T | BaseException] = await asyncio.gather(
        *(call() for call in calls), return_exceptions=True
    )
    for item in results:  # an injected crash in any task is a crash of the process
        if isinstance(item, CrashInjected):
            raise item
    return results


async def run_each(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T | BaseException]:
    """The asyncio counterpart of :func:`coordinator.runtime.run_each`: the awaits overlap
    on the event loop's one thread (the branches' answers arrive at once)."""
    return await run_parallel(calls)
