"""A fixed thread pool with a bounded queue, and what it does to the caller when the queue is full.

``concurrent.futures.ThreadPoolExecutor`` queues without limit: a burst
larger than the pool can run piles up in memory, and a process that dies
loses all of it. :class:`BoundedPool` holds at most ``threads`` tasks running
and ``queue`` waiting; one more is refused or waited for, by its policy:

``block``
    ``submit`` waits until a slot is free (a task ends). Nothing is refused;
    the caller is slowed to the pool's pace. :attr:`PoolStats.blocked_seconds`
    adds up how long callers waited, :attr:`PoolStats.longest_block` the
    longest single wait.
``reject``
    ``submit`` raises :class:`PoolFull` at once. The caller knows the task was
    not taken (nothing is dropped silently) and decides: fail the request,
    retry later, record it. :attr:`PoolStats.rejected` counts them.

A task's exception is kept in its Future and counted (``failed``), never
swallowed.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from coordinator.errors import ConfigurationError, TwoPhaseCommitError

T = TypeVar("T")


class FullQueuePolicy(enum.Enum):
    """What submit does when ``threads`` tasks run and ``queue`` wait."""

    BLOCK = "block"
    REJECT = "reject"


class PoolFull(TwoPhaseCommitError):
    """The pool's queue is full and its policy is ``reject``: the task was not taken."""


@dataclass
class PoolStats:
    """What a pool was given and what became of it."""

    submitted: int = 0  # taken by the pool
    rejected: int = 0  # refused with PoolFull (policy reject)
    completed: int = 0
    failed: int = 0
    blocked: int = 0  # submits that had to wait (policy block)
    blocked_seconds: float = 0.0
    longest_block: float = 0.0
    most_waiting: int = 0  # the deepest the queue got


class BoundedPool:
    """``threads`` threads, at most ``queue`` tasks waiting, a policy for one more."""

    def __init__(
        self, threads: int, queue: int, policy: FullQueuePolicy, *, name: str = "bounded"
    ) -> None:
        if threads < 1 or queue < 0:
            raise ConfigurationError(
                f"pool {name}: threads must be >= 1 and queue >= 0, not {threads} and {queue}"
            )
        self.threads = threads
        self.queue = queue
        self.policy = policy
        self.name = name
        self.stats = PoolStats()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(threads + queue)
        self._lock = threading.Lock()
        self._in_pool = 0  # running or waiting

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Hand ``fn(*args)`` to the pool; PoolFull if it is full and the policy is reject."""
        if not self._slots.acquire(blocking=False):
            if self.policy is FullQueuePolicy.REJECT:
                with self._lock:
                    self.stats.rejected += 1
                raise PoolFull(
                    f"pool {self.name}: {self.threads} tasks running and {self.queue} waiting; "
                    "the task was not taken"
                )
            started = time.perf_counter()
            self._slots.acquire()
            waited = time.perf_counter() - started
            with self._lock:
                self.stats.blocked += 1
                self.stats.blocked_seconds += waited
                self.stats.longest_block = max(self.stats.longest_block, waited)
        with self._lock:
            self.stats.submitted += 1
            self._in_pool += 1
            self.stats.most_waiting = max(self.stats.most_waiting, self._in_pool - self.threads)
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, future: Future[Any] | None) -> None:
        with self._lock:
            self._in_pool -= 1
            if future is not None and not future.cancelled():
                if future.exception() is None:
                    self.stats.completed += 1
                else:
                    self.stats.failed += 1
        self._slots.release()

    def shutdown(self) -> None:
        """Run what was taken, then stop the threads."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> BoundedPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
