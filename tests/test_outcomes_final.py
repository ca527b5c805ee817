"""Outcomes never change after the caller has them: what the backlog finishes or decides
later is told to the coordinator's listeners, never written into the caller's transaction
(docs/design.md §5), on the thread and the asyncio API alike (over fakes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.aio import AsyncCoordinator
from coordinator.backlog import Resolved
from coordinator.coordinator import Coordinator
from coordinator.errors import TransactionInDoubt
from coordinator.log import DecisionLog
from coordinator.log.memory import MemoryDecisionLog
from coordinator.log.table import TableDecisionLog
from coordinator.states import Outcome, TxState
from participants.aio.fake import AsyncFakeBroker, AsyncFakeResource
from participants.fake import FakeBroker, FakeDecisionTable, FakeResource, FakeStore

#: Each story: its fault, whether it needs the broker and decision rows, what the caller
#: is told (outcome, state), what the backlog resolves it to, and the chore that does.
STORIES = {
    "decision row, committed, no answer": (
        ("a", "commit_one_phase", "lost-committed"),
        False,
        (Outcome.IN_DOUBT, TxState.IN_DOUBT),
        Outcome.COMMITTED,
        "resolve_in_doubt",
    ),
    "decision row, no answer, not committed": (
        ("a", "commit_one_phase", "error"),
        False,
        (Outcome.IN_DOUBT, TxState.IN_DOUBT),
        Outcome.ABORTED,
        "resolve_in_doubt",
    ),
    "marker, committed, no receipt": (
        ("mq", "commit", "lost-committed"),
        True,
        (Outcome.IN_DOUBT, TxState.IN_DOUBT),
        Outcome.COMMITTED,
        "resolve_in_doubt",
    ),
    "marker, not committed, no receipt": (
        ("mq", "commit", "lost-not-committed"),
        True,
        (Outcome.IN_DOUBT, TxState.IN_DOUBT),
        Outcome.ABORTED,
        "resolve_in_doubt",
    ),
    "phase 2 deferred": (
        ("b", "commit_prepared", "error"),
        True,
        (Outcome.COMMITTED, TxState.COMMITTED),
        Outcome.COMMITTED,
        "retry_deferred",
    ),
}


class Servers:
    """Fake databases 'a' and 'b' and a broker, with the fault of one story armed."""

    def __init__(self, fault: tuple[str, str, str], broker: bool) -> None:
        store = FakeStore()
        self.res = {name: FakeResource(name, store) for name in ("a", "b")}
        self.broker = FakeBroker("mq") if broker else None
        self.holder = None if broker else FakeDecisionTable(self.res["a"])
        self.log: DecisionLog = (
            MemoryDecisionLog() if self.holder is None else TableDecisionLog(self.holder)
        )
        where, step, action = fault
        server: Any = self.broker if where == "mq" else self.res[where]
        server.fail(step, action, times=5 if step == "commit_prepared" else 1)
        self.heard: list[tuple[Any, Outcome]] = []

    def listen(self, finished: Any, outcome: Outcome) -> None:
        self.heard.append((finished, outcome))

    def check_heard(self, gtrid: str, told: Outcome, resolved: Outcome) -> None:
        """The last thing the listeners heard is the backlog's resolution of ``gtrid``."""
        last, outcome = self.heard[-1]
        assert isinstance(last, Resolved)
        assert (last.gtrid, last.outcome, last.was, outcome) == (gtrid, resolved, told, resolved)


@pytest.mark.parametrize("story", list(STORIES))
def test_a_thread_transaction_never_changes_after_the_caller_has_it(story: str) -> None:
    """Coordinator: the backlog resolves the transaction later; the caller's stays as told,
    and the listeners hear the resolution as a Resolved."""
    fault, broker, told, resolved, chore = STORIES[story]
    servers = Servers(fault, broker)
    coordinator = Coordinator(
        "t1",
        servers.log,
        list(servers.res.values()),
        servers.broker,
        housekeeping_interval=None,
        decision_holder=servers.holder,
    )
    coordinator.add_listener(servers.listen)
    try:
        try:
            with coordinator.transaction() as tx:
                tx.execute("a", "debit")
                tx.execute("b", "credit")
                if broker:
                    tx.send("/queue/transfers", "{}")
        except TransactionInDoubt:
            pass
        assert (tx.outcome, tx.state) == told
        assert getattr(coordinator, chore)() == 1
        assert (tx.outcome, tx.state) == told
        servers.check_heard(tx.gtrid, told[0], resolved)
    finally:
        coordinator.close()
    assert (tx.outcome, tx.state) == told


@pytest.mark.parametrize("story", list(STORIES))
def test_an_asyncio_transaction_never_changes_after_the_caller_has_it(story: str) -> None:
    """AsyncCoordinator: the same stories, the same answer: the caller's transaction stays
    as told; the resolution reaches the listeners."""
    fault, broker, told, resolved, chore = STORIES[story]
    servers = Servers(fault, broker)
    coordinator = AsyncCoordinator(
        "t1",
        servers.log,
        [AsyncFakeResource(r) for r in servers.res.values()],
        AsyncFakeBroker(servers.broker) if servers.broker is not None else None,
        housekeeping_interval=None,
        decision_holder=servers.holder,
    )
    coordinator.add_listener(servers.listen)

    async def scenario() -> tuple[Outcome | None, TxState, Any]:
        async with coordinator:
            try:
                async with coordinator.transaction() as tx:
                    await tx.execute("a", "debit")
                    await tx.execute("b", "credit")
                    if broker:
                        await tx.send("/queue/transfers", "{}")
            except TransactionInDoubt:
                pass
            assert (tx.outcome, tx.state) == told
            assert await getattr(coordinator, chore)() == 1
            return tx.outcome, tx.state, tx

    outcome, state, tx = asyncio.run(scenario())
    assert (outcome, state) == told
    assert (tx.outcome, tx.state) == told
    servers.check_heard(tx.gtrid, told[0], resolved)
