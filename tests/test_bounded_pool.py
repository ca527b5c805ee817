"""The bounded pool: a full queue blocks the caller or refuses the task, never drops it."""

from __future__ import annotations

import threading

import pytest

from coordinator.errors import ConfigurationError
from scenarios.bounded_pool import BoundedPool, FullQueuePolicy, PoolFull


def test_a_full_queue_refuses_the_next_task_to_the_caller() -> None:
    """Policy reject: one running, one waiting, the third submit raises PoolFull and is counted."""
    gate = threading.Event()
    with BoundedPool(1, 1, FullQueuePolicy.REJECT, name="t") as pool:
        first, second = pool.submit(gate.wait), pool.submit(gate.wait)
        with pytest.raises(PoolFull, match="pool t: 1 tasks running and 1 waiting"):
            pool.submit(gate.wait)
        gate.set()
        assert first.result() and second.result()
    assert (pool.stats.submitted, pool.stats.rejected, pool.stats.completed) == (2, 1, 2)


def test_a_full_queue_blocks_the_caller_until_a_task_ends() -> None:
    """Policy block: the next submit waits for room, then the task runs; the wait is measured."""
    gate = threading.Event()
    with BoundedPool(1, 0, FullQueuePolicy.BLOCK) as pool:
        pool.submit(gate.wait)
        taken = threading.Event()
        caller = threading.Thread(target=lambda: (pool.submit(int), taken.set()))
        caller.start()
        assert not taken.wait(0.2), "the second submit returned while the pool was full"
        gate.set()
        caller.join()
    assert taken.is_set()
    assert (pool.stats.submitted, pool.stats.rejected, pool.stats.completed) == (2, 0, 2)
    assert pool.stats.blocked == 1 and pool.stats.blocked_seconds > 0


def test_a_failing_task_is_counted_and_kept_in_its_future() -> None:
    """An exception in a task is counted as failed and raised by its Future's result()."""
    with BoundedPool(1, 1, FullQueuePolicy.REJECT) as pool:
        future = pool.submit(int, "not a number")
        with pytest.raises(ValueError):
            future.result()
    assert (pool.stats.failed, pool.stats.completed) == (1, 0)


def test_a_pool_without_threads_is_refused() -> None:
    """Zero threads is a ConfigurationError naming the pool."""
    with pytest.raises(ConfigurationError, match="pool p: threads must be >= 1"):
        BoundedPool(0, 1, FullQueuePolicy.BLOCK, name="p")
