"""Fencing before reading the decision: a dead session's commit still in flight decides commit.

The marker queue is a safe commit point only once the session that sent the
COMMIT is fenced: until the broker has processed every frame of that
connection, a COMMIT carrying the marker may still land. The fake broker
models that (its ``"in-flight"`` commit fault): the COMMIT went out, no
RECEIPT came, and nothing of it is visible until the session is fenced
(``fence``) or settled (``settle``). Every path that decides by the markers
must fence first, or it rolls the databases back under a marker that lands
a moment later: the recovery pass at start-up, the in-doubt backlog of a
running coordinator, and the recovery of a dead peer. Each is run against
the sync and the asyncio coordinator where both have it.

A decision row is the same (postgres mode): the commit of the branch carrying
it may be in flight until its session ends (the fake database's ``"in-flight"``
one-phase commit lands on ``FakeResource.end_sessions``). The backlog settles
that session, a restarted coordinator joins (ending its earlier incarnation's
sessions) and a peer's recoverer fences the peer, each before reading the rows.

On the lab: what the fake assumes of ActiveMQ, that a dead connection's work is
all undone or applied once its client-id can be taken over.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator import failpoints
from coordinator.aio import AsyncCoordinator
from coordinator.coordinator import Coordinator
from coordinator.errors import CrashInjected, TransactionInDoubt
from coordinator.log.memory import MemoryDecisionLog
from coordinator.log.table import TableDecisionLog
from coordinator.peers import recover_dead
from coordinator.recovery import Decision
from coordinator.states import Outcome
from coordinator.xid import gtrid_prefix
from participants.activemq import client_id_for
from participants.aio.fake import AsyncFakeBroker, AsyncFakeResource
from participants.fake import DECISION_ROW, FakeBroker, FakeDecisionTable, FakeResource, FakeStore
from scenarios.config import Settings
from scenarios.stories import fence_broker_sessions
from scenarios.transfer import model as scenario
from tests.aio_portal import BlockingCoordinator, Portal
from tests.test_dead_letters import browse, credit, private_queue, put
from tests.test_state_machine import bury

__all__ = ["private_queue"]  # the fixture, imported for the lab test

QUEUE = "/queue/transfers.completed"
APIS = ("sync", "asyncio")


class World:
    """Databases a and b, a broker and a decision log that outlive every coordinator."""

    def __init__(self, portal: Portal) -> None:
        self.a, self.b, self.mq = FakeStore(), FakeStore(), FakeStore()
        self.log = MemoryDecisionLog()
        self.portal = portal
        self.broker = FakeBroker("mq", self.mq)  # the latest process's broker client

    def resources(self) -> list[FakeResource]:
        return [FakeResource("a", self.a), FakeResource("b", self.b)]

    def coordinator(self, ident: str, api: str, *, recover: bool) -> Any:
        """A new process's coordinator over the same servers (recovering at start if asked)."""
        self.broker = FakeBroker("mq", self.mq)
        self.log = self.log.reopen()
        if api == "sync":
            return Coordinator(
                ident,
                self.log,
                self.resources(),
                self.broker,
                recover_on_start=recover,
                housekeeping_interval=None,
                peer_interval=None,
            )
        coordinator = AsyncCoordinator(
            ident,
            self.log,
            [AsyncFakeResource(r) for r in self.resources()],
            AsyncFakeBroker(self.broker),
            recover_on_start=recover,
            housekeeping_interval=None,
        )
        return BlockingCoordinator(self.portal, coordinator)

    def transfer_in_flight(self, coordinator: Any) -> tuple[str, Outcome]:
        """Debit a, credit b, one message; the broker's COMMIT gets no RECEIPT and stays
        unprocessed until its session is fenced."""
        tx = coordinator.begin()
        tx.execute("a", "debit")
        tx.execute("b", "credit")
        tx.send(QUEUE, "transfer")
        self.broker.fail("commit", "in-flight")
        return tx.gtrid, tx.commit()

    def assert_committed_everywhere(self, gtrid: str) -> None:
        """The transfer is in a, in b and on the queue, once; nothing is prepared or in flight."""
        assert self.a.committed.get(gtrid) == ["debit"]
        assert self.b.committed.get(gtrid) == ["credit"]
        assert [body for _, body, _ in self.mq.messages] == ["transfer"]
        assert not self.a.prepared and not self.b.prepared and not self.mq.in_flight
        assert gtrid not in self.a.rolled_back | self.b.rolled_back


@pytest.fixture
def world() -> Iterator[World]:
    """Fresh servers, no failpoint armed; the asyncio portal closed after the test."""
    failpoints.disarm()
    portal = Portal()
    yield World(portal)
    failpoints.disarm()
    portal.close()


def crash_with_commit_in_flight(world: World, ident: str, api: str) -> str:
    """A coordinator sends the broker's COMMIT and dies before any answer; its gtrid."""
    coordinator = world.coordinator(ident, api, recover=False)
    failpoints.arm("after_broker_commit", "raise")
    with pytest.raises(CrashInjected):
        world.transfer_in_flight(coordinator)
    bury(coordinator)
    failpoints.disarm()
    assert world.mq.in_flight and not world.mq.markers  # nothing of the COMMIT visible yet
    return next(iter(world.a.prepared)).gtrid


def test_the_fake_broker_shows_an_in_flight_commit_only_once_fenced(world: World) -> None:
    """An unfenced read of the markers misses a COMMIT in flight; after fence() it is there."""
    gtrid = crash_with_commit_in_flight(world, "t1", "sync")
    broker = FakeBroker("mq", world.mq)
    assert gtrid not in broker.markers()
    broker.fence(1.0)
    assert broker.markers() == {gtrid}
    assert [body for _, body, _ in world.mq.messages] == ["transfer"]


@pytest.mark.parametrize("api", APIS)
def test_recovery_fences_the_broker_before_it_reads_the_markers(world: World, api: str) -> None:
    """Recovery at start-up commits a transaction whose dead session's COMMIT was in flight."""
    gtrid = crash_with_commit_in_flight(world, "t1", api)
    coordinator = world.coordinator("t1", api, recover=True)
    try:
        report = coordinator.last_recovery
        assert report is not None and report.fenced
        assert [(i.gtrid, i.marker, i.decision) for i in report.items] == [
            (gtrid, True, Decision.COMMIT)
        ]
        world.assert_committed_everywhere(gtrid)
        assert world.mq.markers == set()  # swept by the pass that resolved it
    finally:
        coordinator.close()


@pytest.mark.parametrize("api", APIS)
def test_in_doubt_backlog_settles_the_session_before_it_reads_the_markers(
    world: World, api: str
) -> None:
    """A running coordinator's in-doubt commit, its COMMIT in flight, is resolved as committed."""
    coordinator = world.coordinator("t1", api, recover=False)
    try:
        gtrid, outcome = world.transfer_in_flight(coordinator)
        assert outcome is Outcome.IN_DOUBT
        assert world.mq.in_flight and not world.mq.markers  # nothing of the COMMIT visible yet
        assert coordinator.resolve_in_doubt() == 1
        world.assert_committed_everywhere(gtrid)
        assert coordinator.in_doubt == []
    finally:
        coordinator.close()
    assert world.mq.markers == set()  # swept on close


class Liveness:
    """Liveness locks as flags; fencing a coordinator ends its sessions on ``databases``
    (what PostgresMembership does with pg_terminate_backend), so their commits land."""

    def __init__(
        self, coordinator_id: str, databases: list[FakeResource], dead: tuple[str, ...] = ()
    ) -> None:
        self.coordinator_id = coordinator_id
        self.databases = databases
        self.dead = dead
        self.fenced: list[str] = []

    def join(self, *, fence_timeout: float = 30.0) -> None:
        self.fence(self.coordinator_id, fence_timeout)  # an earlier incarnation's sessions

    def holds(self) -> bool:
        return True

    def keep(self) -> bool:
        return True

    def leave(self) -> None:
        """Nothing to give back."""

    def peers(self) -> list[str]:
        return [self.coordinator_id, *self.dead]

    def claim(self, peer: str) -> bool:
        return peer in self.dead

    def release(self, peer: str) -> None:
        """Nothing to give back."""

    def fence(self, peer: str, timeout: float) -> None:
        for database in self.databases:
            database.end_sessions(gtrid_prefix(peer))
        self.fenced.append(peer)


def test_peer_recovery_fences_the_dead_peers_broker_before_it_reads_its_markers(
    world: World,
) -> None:
    """A dead peer's transaction, its COMMIT in flight, is committed by the peer's recoverer."""
    gtrid = crash_with_commit_in_flight(world, "p1", "sync")
    membership = Liveness("t1", world.resources(), dead=("p1",))
    done = recover_dead(
        membership, MemoryDecisionLog(), world.resources(), lambda peer: FakeBroker("mq", world.mq)
    )
    assert [(d.peer, d.resolved) for d in done] == [("p1", True)]
    assert membership.fenced == ["p1"]
    report = done[0].report
    assert report is not None and report.fenced
    assert [(i.gtrid, i.decision) for i in report.items] == [(gtrid, Decision.COMMIT)]
    world.assert_committed_everywhere(gtrid)


def carrier_coordinator(world: World, ident: str, membership: Liveness | None = None) -> Any:
    """A coordinator in postgres mode: no broker, decision rows in 'a' (recovering at start
    when it has ``membership``, which it joins first)."""
    table = FakeDecisionTable(FakeResource("a", world.a))
    return Coordinator(
        ident,
        TableDecisionLog(table, end_batch=1),
        [table.resource, FakeResource("b", world.b)],
        decision_holder=table,
        recover_on_start=membership is not None,
        housekeeping_interval=None,
        membership=membership,
        peer_interval=None,
    )


def row_commit_in_flight(coordinator: Any) -> str:
    """Debit a, credit b; the commit of 'a', carrying the decision row, gets no answer and
    lands only when its session ends. The gtrid, in doubt."""
    coordinator.resources["a"].fail("commit_one_phase", "in-flight")
    with pytest.raises(TransactionInDoubt), coordinator.transaction() as tx:
        tx.execute("a", "debit")
        tx.execute("b", "credit")
    return str(tx.gtrid)


def assert_row_committed_everywhere(world: World, gtrid: str) -> None:
    """Debit and decision row in a, credit in b; nothing prepared or in flight."""
    assert world.a.committed.get(gtrid) == ["debit", DECISION_ROW]
    assert world.b.committed.get(gtrid) == ["credit"]
    assert not world.b.prepared and not world.a.unanswered_commits
    assert gtrid not in world.b.rolled_back


def test_in_doubt_backlog_ends_the_carrier_session_before_it_reads_the_decision_row(
    world: World,
) -> None:
    """The decision row's commit in flight when its answer was lost: resolved as committed."""
    coordinator = carrier_coordinator(world, "t1")
    try:
        gtrid = row_commit_in_flight(coordinator)
        assert gtrid not in world.a.committed  # nothing of the commit visible yet
        assert coordinator.resolve_in_doubt() == 1
        assert_row_committed_everywhere(world, gtrid)
    finally:
        coordinator.close()


def test_a_restart_ends_the_earlier_sessions_before_recovery_reads_the_decision_rows(
    world: World,
) -> None:
    """A coordinator dies with its row's commit in flight; restarted, it commits the transaction."""
    dead = carrier_coordinator(world, "t1")
    gtrid = row_commit_in_flight(dead)
    bury(dead)
    assert gtrid not in world.a.committed
    membership = Liveness("t1", [FakeResource("a", world.a)])
    coordinator = carrier_coordinator(world, "t1", membership)
    try:
        report = coordinator.last_recovery
        assert report is not None
        assert [(i.gtrid, i.decision_row, i.decision) for i in report.items] == [
            (gtrid, True, Decision.COMMIT)
        ]
        assert_row_committed_everywhere(world, gtrid)
    finally:
        coordinator.close()


def test_peer_recovery_ends_the_dead_peers_sessions_before_it_reads_its_decision_rows(
    world: World,
) -> None:
    """A dead peer's transaction, its row's commit in flight, is committed by its recoverer."""
    dead = carrier_coordinator(world, "p1")
    gtrid = row_commit_in_flight(dead)
    bury(dead)
    membership = Liveness("t1", [FakeResource("a", world.a)], dead=("p1",))
    table = FakeDecisionTable(FakeResource("a", world.a))
    done = recover_dead(
        membership,
        TableDecisionLog(table, end_batch=1),
        [table.resource, FakeResource("b", world.b)],
        lambda peer: None,
        decision_holder=table,
    )
    assert [(d.peer, d.resolved) for d in done] == [("p1", True)]
    report = done[0].report
    assert report is not None
    assert [(i.gtrid, i.decision) for i in report.items] == [(gtrid, Decision.COMMIT)]
    assert_row_committed_everywhere(world, gtrid)


#: A process that takes the one message of a queue, ACKs it in a transaction it never ends,
#: says so, and waits to be killed.
HOLDER = """
import sys
from scenarios.config import Settings
from scenarios.wiring import open_stomp
client = open_stomp(Settings.load(), client_id=sys.argv[2])
message = client.subscribe(sys.argv[1], ack="client-individual", prefetch=1).get(10)
client.begin("held")
client.request("ACK", {"id": message.ack_id, "transaction": "held"}, timeout=5, what="ACK")
print("acked", flush=True)
sys.stdin.read()
"""


@pytest.mark.lab
def test_activemq_a_killed_sessions_open_ack_is_undone_once_its_client_id_is_taken_over(
    settings: Settings, private_queue: str
) -> None:
    """SIGKILL holding an ACK in an open transaction: once fenced, a browse shows the message."""
    client_id = client_id_for("fence-probe", 0)
    env = {**os.environ, **settings.as_env()}
    for attempt in range(5):  # the broker's lag after the kill varies: give it several chances
        put(settings, private_queue, [credit(f"held-{attempt}")])
        with subprocess.Popen(
            [sys.executable, "-c", HOLDER, private_queue, client_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        ) as holder:
            try:
                assert holder.stdout is not None and holder.stdout.readline() == "acked\n"
                assert browse(settings, private_queue) == []  # ACKed, transaction open: hidden
            finally:
                holder.kill()  # SIGKILL; leaving the block closes the pipes and reaps it
        fence_broker_sessions(settings, "fence-probe", timeout=10.0)
        seen = [m.headers["transfer-id"] for m in browse(settings, private_queue)]
        assert seen == [f"held-{attempt}"]
        scenario.drain(settings, private_queue)
