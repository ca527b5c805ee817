"""The commit-markable path (docs/design.md §3) over fake participants: the decision is a row
committed one-phase in participant 'a''s own branch, after the others prepared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from coordinator import events, failpoints
from coordinator.coordinator import Coordinator
from coordinator.errors import (
    CrashInjected,
    DecisionLogError,
    TransactionAborted,
    TransactionInDoubt,
)
from coordinator.log.table import TableDecisionLog
from coordinator.recovery import Decision, decide
from coordinator.states import Outcome
from participants.fake import DECISION_ROW, FakeBroker, FakeDecisionTable, FakeResource, FakeStore
from scenarios.log_setup import configure as configure_logging


class FakeMembership:
    """Liveness as a flag: ``alive`` False is a coordinator that lost its lock."""

    def __init__(self, coordinator_id: str) -> None:
        self.coordinator_id = coordinator_id
        self.alive = True
        self.joined = 0

    def join(self, *, fence_timeout: float = 30.0) -> None:
        self.joined += 1

    def holds(self) -> bool:
        return self.alive

    def keep(self) -> bool:
        return self.alive

    def leave(self) -> None:
        self.alive = False

    def peers(self) -> list[str]:
        return []

    def claim(self, peer: str) -> bool:
        return False

    def release(self, peer: str) -> None:
        pass

    def fence(self, peer: str, timeout: float) -> None:
        pass


class World:
    """Fake databases a, b, c and a broker that outlive coordinators; decision rows in 'a'."""

    def __init__(self) -> None:
        self.stores = {name: FakeStore() for name in ("a", "b", "c", "mq")}
        self.membership = FakeMembership("t1")

    def coordinator(self, *, broker: bool = False, recover: bool = True) -> Coordinator:
        self.res = {name: FakeResource(name, self.stores[name]) for name in ("a", "b", "c")}
        self.table = FakeDecisionTable(self.res["a"])
        self.log = TableDecisionLog(self.table, end_batch=1)
        self.broker = FakeBroker("mq", self.stores["mq"]) if broker else None
        return Coordinator(
            "t1",
            self.log,
            list(self.res.values()),
            self.broker,
            recover_on_start=recover,
            housekeeping_interval=None,
            membership=self.membership,
            decision_holder=self.table,
        )  # type: ignore[arg-type]


@pytest.fixture
def world() -> Iterator[World]:
    failpoints.disarm()
    yield World()
    failpoints.disarm()


def test_decide_commits_on_a_decision_row_alone() -> None:
    """The one decision rule: a decision row decides COMMIT; no row and no marker, ROLLBACK."""
    assert decide(False, False, True) is Decision.COMMIT
    assert decide(False, False, False) is Decision.ROLLBACK


def test_a_branch_prepares_early_only_beside_others_and_never_on_the_decision_holder(
    world: World,
) -> None:
    """prepares_early (end_work's choice): no while one transaction is in flight; yes for 'b'
    once two are; never for 'a', which holds the decision rows."""
    coord = world.coordinator()
    first = coord.begin()
    assert [coord.prepares_early(name) for name in ("a", "b")] == [False, False]
    second = coord.begin()
    assert [coord.prepares_early(name) for name in ("a", "b")] == [False, True]
    for tx in (first, second):
        tx.rollback()
    assert coord.prepares_early("b") is False
    coord.close()


def test_the_carrier_commits_one_phase_with_its_row_after_the_others_prepared(
    world: World,
) -> None:
    """'a' is never prepared: its row commits with its work; 'b' prepares first, then commits."""
    coord = world.coordinator()
    configure_logging("DEBUG")
    try:
        with capture_logs() as logs, coord.transaction() as tx:
            tx.execute("a", "debit")
            tx.execute("b", "credit")
    finally:
        configure_logging()
    assert tx.outcome is Outcome.COMMITTED
    assert world.stores["a"].committed[tx.gtrid] == ["debit", DECISION_ROW]
    assert world.stores["b"].committed[tx.gtrid] == ["credit"]
    assert world.stores["a"].prepared == {} and world.stores["b"].prepared == {}
    prepared = [e for e in logs if e["event"] == events.PREPARE_STARTED]
    assert prepared[0]["participants"] == ["b"]
    reached = [e for e in logs if e["event"] == events.COMMIT_POINT_REACHED]
    assert reached[0]["via"] == "decision-row"
    assert coord.log.forced_writes == 0
    assert tx.gtrid in world.stores["a"].forgotten_rows  # END deleted the row (batch of 1)
    coord.close()


def test_a_transaction_that_did_not_touch_the_carrier_gets_a_branch_for_the_row(
    world: World,
) -> None:
    """Writes on 'b' and 'c' only: a branch on 'a' is begun for the decision row alone."""
    coord = world.coordinator()
    with coord.transaction() as tx:
        tx.execute("b", "credit")
        tx.execute("c", "note")
    assert world.stores["a"].committed[tx.gtrid] == [DECISION_ROW]
    assert world.stores["b"].committed[tx.gtrid] == ["credit"]
    assert world.stores["c"].committed[tx.gtrid] == ["note"]
    coord.close()


def test_with_a_broker_writer_the_marker_decides_and_no_row_is_written(world: World) -> None:
    """A broker branch keeps the marker path: 'a' prepares, no decision row anywhere."""
    coord = world.coordinator(broker=True)
    with coord.transaction() as tx:
        tx.execute("a", "debit")
        tx.execute("b", "credit")
        tx.send("/queue/transfers", "{}")
    assert world.stores["mq"].markers == {tx.gtrid}
    assert DECISION_ROW not in world.stores["a"].committed[tx.gtrid]
    assert coord.log.forced_writes == 0
    coord.close()


def test_a_forced_record_is_refused_by_a_log_without_local_state(world: World) -> None:
    """TableDecisionLog never writes a decision of its own: a forced COMMIT raises."""
    world.coordinator(recover=False)
    with pytest.raises(DecisionLogError, match="decision row"):
        world.log.log_commit("t1.x", ("a", "b"), force=True)


def test_a_crash_before_the_carrier_commits_rolls_back_at_restart(world: World) -> None:
    """No row: recovery rolls back 'b''s prepared branch; 'a' never committed."""
    coord = world.coordinator()
    failpoints.arm("before_decision_row_commit")
    tx = coord.begin()
    tx.execute("a", "debit")
    tx.execute("b", "credit")
    with pytest.raises(CrashInjected):
        tx.commit()
    failpoints.disarm()
    assert list(world.stores["b"].prepared) and tx.gtrid not in world.stores["a"].committed
    restarted = world.coordinator()
    assert world.stores["b"].prepared == {}
    assert tx.gtrid in world.stores["b"].rolled_back
    assert restarted.last_recovery is not None
    assert [i.decision for i in restarted.last_recovery.items] == [Decision.ROLLBACK]
    restarted.close()


def test_a_crash_after_the_carrier_committed_commits_at_restart_and_drops_the_row(
    world: World,
) -> None:
    """A row: recovery commits 'b''s prepared branch, then deletes the row."""
    coord = world.coordinator()
    failpoints.arm("after_decision_row_commit")
    tx = coord.begin()
    tx.execute("a", "debit")
    tx.execute("b", "credit")
    with pytest.raises(CrashInjected):
        tx.commit()
    failpoints.disarm()
    restarted = world.coordinator()
    assert world.stores["b"].committed[tx.gtrid] == ["credit"]
    assert world.stores["b"].prepared == {}
    assert tx.gtrid in world.stores["a"].forgotten_rows
    assert restarted.last_recovery is not None
    assert [i.decision_row for i in restarted.last_recovery.items] == [True]
    restarted.close()


@pytest.mark.parametrize(("fault", "committed"), [("error", False), ("lost-committed", True)])
def test_a_carrier_commit_without_answer_is_in_doubt_then_settled_and_decided_by_the_row(
    world: World, fault: str, committed: bool
) -> None:
    """No answer to the carrier's commit: IN_DOUBT; the backlog settles it and reads the row."""
    coord = world.coordinator()
    world.res["a"].fail("commit_one_phase", fault)
    with pytest.raises(TransactionInDoubt), coord.transaction() as tx:
        tx.execute("a", "debit")
        tx.execute("b", "credit")
    assert coord.in_doubt == [tx.gtrid]
    assert coord.resolve_in_doubt() == 1
    assert world.table.settled == [tx.gtrid]
    assert world.stores["b"].prepared == {}
    assert (tx.gtrid in world.stores["b"].committed) is committed
    assert (tx.gtrid in world.stores["b"].rolled_back) is not committed
    coord.close()


def test_a_refused_carrier_commit_aborts_and_rolls_back_the_others(world: World) -> None:
    """The server refused the carrier's COMMIT: nothing decided, 'b' is rolled back."""
    coord = world.coordinator()
    world.res["a"].fail("commit_one_phase", "refuse")
    with pytest.raises(TransactionAborted, match="refused"), coord.transaction() as tx:
        tx.execute("a", "debit")
        tx.execute("b", "credit")
    assert world.stores["b"].prepared == {}
    assert tx.gtrid in world.stores["b"].rolled_back
    coord.close()


def test_a_coordinator_without_its_liveness_lock_reaches_no_commit_point(world: World) -> None:
    """Lock lost after phase 1: ABORTED, the prepared branch rolled back, no row written."""
    coord = world.coordinator()
    tx = coord.begin()
    tx.execute("a", "debit")
    tx.execute("b", "credit")
    world.membership.alive = False
    with pytest.raises(TransactionAborted, match="liveness lock"), tx:
        pass
    assert world.stores["b"].prepared == {}
    assert tx.gtrid not in world.stores["a"].committed
    assert world.membership.joined == 1
    coord.close()
