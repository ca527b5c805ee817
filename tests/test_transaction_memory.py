"""What a transaction holds while in flight: its dicts and its logger made on first use.

A coordinator can have thousands of transactions begun and waiting; each holds its
identity and state, and makes its branch and phase dicts and binds its logger only
when it first needs them. Without a lab: fake participants.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from coordinator import tracing
from coordinator.aio import AsyncCoordinator
from coordinator.coordinator import Coordinator
from coordinator.log.memory import MemoryDecisionLog
from coordinator.states import Outcome
from participants.aio.fake import AsyncFakeBroker, AsyncFakeResource
from participants.fake import FakeBroker, FakeResource, FakeStore

IN_FLIGHT = 200
#: Python heap bytes one begun transaction may hold: its object (no __dict__), its gtrid,
#: its start time and its entry among the coordinator's active ones (about 320).
HEAP_LIMIT = 512


@pytest.fixture(autouse=True)
def no_tracer_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The figures are for a process without a tracer provider (another test may have set
    one for the whole process): with one, each transaction carries its span, by design."""
    monkeypatch.setattr(tracing, "ENABLED", False)
    yield
    monkeypatch.undo()
    tracing.decide()


def held_per_transaction(begin: Callable[[], object]) -> float:
    """Python heap bytes still allocated per transaction after ``IN_FLIGHT`` calls of ``begin``."""
    begun = [begin()]  # the first one warms what is made once
    gc.collect()
    tracemalloc.start()
    try:
        begun += [begin() for _ in range(IN_FLIGHT)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return held / IN_FLIGHT


def sync_coordinator() -> Coordinator:
    return Coordinator(
        "t1",
        MemoryDecisionLog(),
        [FakeResource(n, FakeStore()) for n in ("a", "b")],
        FakeBroker("mq"),
        housekeeping_interval=None,
    )


def async_coordinator() -> AsyncCoordinator:
    return AsyncCoordinator(
        "t1",
        MemoryDecisionLog(),
        [AsyncFakeResource(FakeResource(n, FakeStore())) for n in ("a", "b")],
        AsyncFakeBroker(FakeBroker("mq")),
        housekeeping_interval=None,
    )


def test_a_begun_thread_transaction_holds_a_few_hundred_bytes() -> None:
    """A sync transaction begun and waiting holds under 512 bytes of Python heap."""
    coordinator = sync_coordinator()
    try:
        assert held_per_transaction(coordinator.begin) < HEAP_LIMIT
    finally:
        coordinator.close()


def test_a_begun_asyncio_transaction_holds_a_few_hundred_bytes() -> None:
    """An asyncio transaction begun and waiting holds under 512 bytes of Python heap."""

    async def measure() -> float:
        async with async_coordinator() as coordinator:
            return held_per_transaction(coordinator.begin)

    assert asyncio.run(measure()) < HEAP_LIMIT


def test_thread_transaction_makes_its_branches_timings_and_logger_when_first_needed() -> None:
    """A sync transaction has no __dict__; its branches, timings and logger appear with use."""
    coordinator = sync_coordinator()
    try:
        tx = coordinator.begin()
        assert_made_lazily(tx)
        tx.execute("a", "INSERT a")
        tx.execute("b", "INSERT b")
        tx.send("/queue/q", "body")
        assert tx.commit() is Outcome.COMMITTED
        assert_used(tx)
    finally:
        coordinator.close()


def test_asyncio_transaction_makes_its_branches_timings_and_logger_when_first_needed() -> None:
    """An asyncio transaction has no __dict__; its branches, timings and logger appear with use."""

    async def run() -> None:
        async with async_coordinator() as coordinator:
            tx = coordinator.begin()
            assert_made_lazily(tx)
            await tx.execute("a", "INSERT a")
            await tx.execute("b", "INSERT b")
            await tx.send("/queue/q", "body")
            assert await tx.commit() is Outcome.COMMITTED
            assert_used(tx)

    asyncio.run(run())


def assert_made_lazily(tx: Any) -> None:
    assert not hasattr(tx, "__dict__")
    assert dict(tx.branches) == {} and tx.timings == {}
    assert tx._log is None and tx._timings is None
    assert tx.deadline == tx.started + tx.timeout


def assert_used(tx: Any) -> None:
    assert sorted(tx.branches) == ["a", "b"]
    assert tx.timings and all(seconds >= 0.0 for seconds in tx.timings.values())
    assert tx.log is tx.log and tx.log._context["gtrid"] == tx.gtrid
