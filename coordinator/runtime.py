"""What the synchronous commit sequence runs on: its configuration and parallel calls on threads.

:mod:`coordinator.driver` is generated from :mod:`coordinator.aio.driver`; the
few things that differ between threads and asyncio live here and in
:mod:`coordinator.aio.runtime`, under the same names.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TypeVar

from coordinator.errors import CrashInjected
from coordinator.log import DecisionLog
from coordinator.protocol import DecisionHolder
from coordinator.transaction import Transaction

T = TypeVar("T")


@dataclass
class DriverConfig:
    """What the commit sequence needs from its coordinator."""

    log: DecisionLog
    executor: Executor
    failpoint: Callable[[str], None]
    receipt_timeout: float = 5.0
    phase2_attempts: int = 3
    phase2_backoff: float = 0.05
    defer: Callable[[Transaction], None] = lambda tx: None  # phase 2 left for later
    # The participant that holds the decisions as rows, if the coordinator was given one
    # (docs/design.md §3): without a broker writer, its branch carries the decision row.
    decision_holder: DecisionHolder | None = None
    # Whether this coordinator may reach a commit point now: False once it lost its
    # liveness lock (docs/design.md §4: a peer may be fencing it). Asked right before each one.
    may_decide: Callable[[], bool] = lambda: True

    def run_parallel(self, calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
        """Run ``calls`` at once on the executor; return results or exceptions."""
        return run_parallel(self.executor, calls)

    def run_each(self, calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
        """Wait for each branch's answer, one after the other on this thread (the driver
        sent every branch its command first, so the branches work at once)."""
        return run_each(calls)

    def log_commit(self, gtrid: str, participants: Sequence[str], *, force: bool) -> None:
        """Write the COMMIT record (forced: durable on return)."""
        self.log.log_commit(gtrid, participants, force=force)

    def log_end(self, gtrid: str) -> None:
        """Write the END record (lazily)."""
        self.log.log_end(gtrid)


def _submit(executor: Executor, call: Callable[[], T]) -> Future[T]:
    """``call`` on the executor in a copy of this context (so the gtrid stays bound),
    or here and now once the executor is shut down (a closed coordinator)."""
    context = contextvars.copy_context()
    try:
        return executor.submit(context.run, call)
    except RuntimeError:
        done: Future[T] = Future()
        try:
            done.set_result(call())
        except BaseException as exc:
            done.set_exception(exc)
        return done


def run_each(calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run ``calls`` one after the other on this thread; return results or exceptions.

    An injected crash stops at once, as a real one would.
    """
    results: list[T | BaseException] = []
    for call in calls:
        try:
            results.append(call())
        except CrashInjected:
            raise
        except BaseException as exc:
            results.append(exc)
    return results


def run_parallel(executor: Executor, calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run ``calls`` at once (the last one on this thread); return results or exceptions."""
    futures: list[Future[T]] = [_submit(executor, call) for call in calls[:-1]]
    results: list[T | BaseException] = []
    last: T | BaseException
    try:
        last = calls[-1]()
    except BaseException as exc:
        last = exc
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:
            results.append(exc)
    results.append(last)
    for item in results:  # an injected crash on any thread is a crash of the process
        if isinstance(item, CrashInjected):
            raise item
    return results
