"""The commit sequence and recovery over fake participants and the in-memory log."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import structlog

from coordinator import events, failpoints
from coordinator.coordinator import Coordinator
from coordinator.errors import (
    CrashInjected,
    DuplicateGtrid,
    InvalidXid,
    TransactionAborted,
    TransactionInDoubt,
    TwoPhaseCommitError,
    UnknownParticipant,
)
from coordinator.log.memory import MemoryDecisionLog
from coordinator.states import Outcome, TxEvent, TxState
from coordinator.xid import Xid
from participants.fake import FakeBroker, FakeResource, FakeStore
from scenarios.log_setup import configure as configure_logging
from tests.chores import FirstRoundBreaks


class World:
    """Fake servers that outlive coordinators, and a log that outlives them too."""

    def __init__(self) -> None:
        self.a = FakeStore()
        self.b = FakeStore()
        self.mq = FakeStore()
        self.log = MemoryDecisionLog()

    def coordinator(
        self, *, broker: bool = True, recover: bool = True, **kw: object
    ) -> Coordinator:
        self.ra = FakeResource("a", self.a)
        self.rb = FakeResource("b", self.b)
        self.broker = FakeBroker("mq", self.mq) if broker else None
        return Coordinator(
            "t1", self.log, [self.ra, self.rb], self.broker, recover_on_start=recover, **kw
        )  # type: ignore[arg-type]

    def restart(self, **kw: object) -> Coordinator:
        """A new coordinator after a crash: only what the log forced survives."""
        self.log = self.log.reopen()
        return self.coordinator(**kw)


@pytest.fixture
def world() -> Iterator[World]:
    failpoints.disarm()
    yield World()
    failpoints.disarm()


def transfer(tx_work: Callable[..., None] | None = None) -> Callable[..., None]:
    def work(tx: object) -> None:
        tx.execute("a", "debit")  # type: ignore[attr-defined]
        tx.execute("b", "credit")  # type: ignore[attr-defined]
        tx.send("/queue/transfers", "{}", {"transfer-id": "t"})  # type: ignore[attr-defined]

    return tx_work or work


def test_happy_path_commits_everywhere_and_ends(world: World) -> None:
    """Two writers and a broker: both branches committed, message and marker sent, END logged."""
    coord = world.coordinator()
    with coord.transaction() as tx:
        transfer()(tx)
    assert tx.outcome is Outcome.COMMITTED
    assert world.a.committed[tx.gtrid] == ["debit"]
    assert world.b.committed[tx.gtrid] == ["credit"]
    assert world.a.prepared == {} and world.b.prepared == {}
    assert [m[0] for m in world.mq.messages] == ["/queue/transfers"]
    assert tx.gtrid in world.mq.markers
    assert world.log.pending() == {}
    coord.close()
    assert world.mq.markers == set()  # swept once the transaction ended


def test_no_vote_aborts_and_leaves_nothing(world: World) -> None:
    """A NO vote rolls back the prepared branch and the broker; nothing is logged."""
    coord = world.coordinator()
    world.rb.fail("prepare", "no")
    with pytest.raises(TransactionAborted), coord.transaction() as tx:
        transfer()(tx)
    assert tx.outcome is Outcome.ABORTED
    assert world.a.committed == {} and world.b.committed == {}
    assert world.a.prepared == {} and world.b.prepared == {}
    assert world.mq.messages == [] and world.mq.markers == set()
    assert world.log.forced_writes == 0


def test_broker_error_at_commit_point_aborts(world: World) -> None:
    """An ERROR answer to the broker's COMMIT rolls back phase 1."""
    coord = world.coordinator()
    world.broker.fail("commit", "refuse")  # type: ignore[union-attr]
    with pytest.raises(TransactionAborted), coord.transaction() as tx:
        transfer()(tx)
    assert world.a.prepared == {} and world.b.prepared == {}
    assert world.a.committed == {} and world.mq.messages == []


@pytest.mark.parametrize(
    ("fault", "expected"), [("lost-committed", "commit"), ("lost-not-committed", "rollback")]
)
def test_lost_receipt_is_in_doubt_and_recovery_follows_the_marker(
    world: World, fault: str, expected: str
) -> None:
    """No answer to COMMIT: IN_DOUBT, branches stay prepared; recovery decides by the marker."""
    coord = world.coordinator()
    world.broker.fail("commit", fault)  # type: ignore[union-attr]
    with pytest.raises(TransactionInDoubt) as info, coord.transaction() as tx:
        transfer()(tx)
    assert info.value.gtrid == tx.gtrid and "twopc recover" in str(info.value)
    assert len(world.a.prepared) == 1 and len(world.b.prepared) == 1
    report = coord.recover()
    (item,) = report.items
    assert item.decision.value == expected
    assert world.a.prepared == {} and world.b.prepared == {}
    if expected == "commit":
        assert tx.gtrid in world.a.committed and tx.gtrid in world.b.committed
        assert world.mq.markers == set()
    else:
        assert world.a.committed == {} and world.b.committed == {}


def test_without_broker_the_forced_log_record_is_the_commit_point(world: World) -> None:
    """Two databases, no broker: one forced decision write per commit, END lazy."""
    coord = world.coordinator(broker=False)
    for _ in range(3):
        with coord.transaction() as tx:
            tx.execute("a", "x")
            tx.execute("b", "y")
    assert world.log.forced_writes == 3
    assert len(world.a.committed) == 3 and len(world.b.committed) == 3


def test_read_only_and_single_writer_skip_phase_one(world: World) -> None:
    """A read-only branch commits one-phase; a single writer commits one-phase; no log write."""
    coord = world.coordinator()
    with coord.transaction() as tx:
        tx.branch("a")  # begun, nothing written
        tx.execute("b", "only-writer")
    assert tx.outcome is Outcome.COMMITTED
    assert world.b.committed[tx.gtrid] == ["only-writer"]
    assert world.a.prepared == {} and world.b.prepared == {}
    assert world.log.forced_writes == 0 and world.mq.markers == set()


def test_phase_two_failure_never_aborts(world: World) -> None:
    """COMMIT PREPARED failing every retry: still COMMITTED; recovery finishes it."""
    coord = world.coordinator()
    world.rb.fail("commit_prepared", "error", times=3)
    with coord.transaction() as tx:
        transfer()(tx)
    assert tx.outcome is Outcome.COMMITTED
    assert tx.gtrid in world.a.committed and len(world.b.prepared) == 1
    coord.close()  # retries what was deferred
    assert tx.gtrid in world.b.committed and world.b.prepared == {}


@pytest.mark.parametrize(
    ("point", "expected_committed"),
    [
        ("after_begin", False),
        ("after_prepare", False),
        ("before_broker_commit", False),
        ("after_broker_commit", True),
        ("after_decision", True),
        ("after_commit_prepared", True),
        ("before_end", True),
    ],
)
def test_crash_at_each_step_then_recovery_agrees(
    world: World, point: str, expected_committed: bool
) -> None:
    """A crash at any step, then a new coordinator: all committed or all rolled back."""
    coord = world.coordinator()
    failpoints.arm(point, "raise")
    with pytest.raises(CrashInjected), coord.transaction() as tx:
        transfer()(tx)
    gtrid = tx.gtrid
    world.restart()
    assert world.a.prepared == {} and world.b.prepared == {}
    committed = [gtrid in s.committed for s in (world.a, world.b)]
    assert committed == [expected_committed] * 2
    assert bool(world.mq.messages) is expected_committed
    assert world.mq.markers == set()
    assert world.log.pending() == {}


def test_failpoint_armed_with_a_callable_runs_it_there_and_goes_on(world: World) -> None:
    """A callable failpoint runs at its step, once, on its n-th hit; the commit then goes on."""
    coord = world.coordinator()
    seen: list[tuple[bool, bool]] = []  # (a and b prepared, anything committed) at each run

    def look() -> None:
        prepared = bool(world.a.prepared) and bool(world.b.prepared)
        seen.append((prepared, bool(world.a.committed or world.b.committed)))

    failpoints.arm("after_prepare", look, on_hit=2)
    with coord.transaction() as tx:
        transfer()(tx)
    assert tx.outcome is Outcome.COMMITTED
    assert seen == [(True, False)]  # after the second of two prepares, before phase 2
    assert not failpoints.is_armed("after_prepare")
    with coord.transaction() as tx:
        transfer()(tx)
    assert len(seen) == 1  # fired once only


def test_transaction_still_open_at_close_is_rolled_back_when_ended(world: World) -> None:
    """Committing a transaction after its coordinator closed rolls it back, saying why."""
    coord = world.coordinator()
    with pytest.raises(TransactionAborted) as info, coord.transaction() as tx:
        transfer()(tx)
        coord.close()
    assert "the coordinator was closed before this transaction committed" in str(info.value)
    assert tx.outcome is Outcome.ABORTED
    assert world.a.committed == {} and world.b.committed == {}
    assert world.a.prepared == {} and world.b.prepared == {} and world.mq.messages == []


def test_close_lets_a_commit_already_running_finish(world: World) -> None:
    """close() waits for a commit past its start; it commits everywhere and logs its END."""
    coord = world.coordinator()
    prepared = threading.Event()

    def pause() -> None:  # the commit has prepared both branches; close() starts meanwhile
        prepared.set()
        time.sleep(0.3)

    failpoints.arm("after_prepare", pause, on_hit=2)
    tx = coord.begin()
    transfer()(tx)
    committer = threading.Thread(target=tx.commit)
    committer.start()
    assert prepared.wait(5)
    coord.close()
    assert tx.outcome is Outcome.COMMITTED  # set before close() returned
    committer.join()
    assert tx.gtrid in world.a.committed and tx.gtrid in world.b.committed
    assert world.log.reopen().pending() == {}


def test_timeout_before_commit_point_aborts(world: World) -> None:
    """A transaction past its deadline is rolled back, not committed."""
    coord = world.coordinator(timeout=0.05)
    with pytest.raises(TransactionAborted) as info, coord.transaction() as tx:
        transfer()(tx)
        time.sleep(0.1)
    assert "timeout" in info.value.reason
    assert world.a.prepared == {} and world.a.committed == {}


def test_the_watchdog_cancels_a_phase_1_that_outlives_the_timeout(world: World) -> None:
    """A PREPARE that waits (work sent with it, behind a lock) past the deadline is cancelled
    by the watchdog, which says so (tpc.timeout during phase 1): the transaction aborts
    naming the timeout, and nothing is prepared."""
    coord = world.coordinator(timeout=0.3)
    world.ra.fail("prepare", "wait")
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(TransactionAborted) as info,
        coord.transaction() as tx,
    ):
        transfer()(tx)
    timeouts = [e for e in logs if e["event"] == events.TIMEOUT]
    assert [(e["gtrid"], e["during"]) for e in timeouts] == [(tx.gtrid, "preparing")]
    assert "exceeded its timeout during phase 1" in info.value.reason
    assert "canceling statement" in info.value.reason
    assert tx.timed_out and world.a.prepared == {} and world.b.prepared == {}
    assert tx.gtrid not in world.a.committed and tx.gtrid not in world.b.committed
    coord.close()


def test_a_timed_out_transaction_and_its_commit_point_exclude_each_other(world: World) -> None:
    """Marked timed out in phase 1, a transaction never steps to its commit point; once
    there, the watchdog's mark is refused and it cancels nothing."""
    coord = world.coordinator()
    late, on_time = coord.begin(), coord.begin()
    for tx in (late, on_time):
        tx.execute("a", "debit")
        tx.handle(TxEvent.PREPARE)
    assert [b.name for b in late.time_out()] == ["a"] and late.timed_out
    assert not late.reach_commit_point() and late.state is TxState.PREPARING
    assert on_time.reach_commit_point() and on_time.state is TxState.COMMITTING
    assert on_time.time_out() == [] and not on_time.timed_out
    for tx in (late, on_time):
        tx.branches["a"].rollback()
    coord.close()


def test_exception_in_work_rolls_back_and_propagates(world: World) -> None:
    """An error raised by the caller's work rolls everything back and is re-raised."""
    coord = world.coordinator()
    with pytest.raises(ZeroDivisionError), coord.transaction() as tx:
        tx.execute("a", "debit")
        1 / 0  # noqa: B018
    assert tx.outcome is Outcome.ABORTED and world.a.committed == {}


def test_bad_input_is_refused_before_anything_starts(world: World) -> None:
    """Malformed and foreign gtrids, duplicates and unknown participants are clear errors."""
    coord = world.coordinator()
    with pytest.raises(InvalidXid, match="contains"):
        coord.begin("t1.'; COMMIT PREPARED 'x")
    with pytest.raises(InvalidXid, match="65 characters"):
        coord.begin("t1." + "x" * 62)
    with pytest.raises(TwoPhaseCommitError, match=r"must start with 't1\.'"):
        coord.begin("other.1")
    tx = coord.begin("t1.dup")
    with pytest.raises(DuplicateGtrid):
        coord.begin("t1.dup")
    with pytest.raises(UnknownParticipant, match="no participant named 'c'"):
        tx.branch("c")
    tx.rollback()
    assert world.a.prepared == {} and world.a.committed == {}


def test_every_protocol_step_emits_an_event_with_the_gtrid(world: World) -> None:
    """Events in protocol order, each carrying the gtrid."""
    configure_logging("DEBUG")
    coord = world.coordinator()
    with structlog.testing.capture_logs() as logs, coord.transaction() as tx:
        transfer()(tx)
    names = [e["event"] for e in logs if e.get("gtrid") == tx.gtrid]
    expected = [
        events.BEGIN,
        events.PREPARE_STARTED,
        events.COMMIT_POINT_STARTED,
        events.COMMIT_POINT_REACHED,
        events.DECISION_LOGGED,
        events.PHASE2_COMMITTED,
        events.END,
    ]
    positions = [names.index(name) for name in expected]
    assert positions == sorted(positions)
    configure_logging()


@pytest.mark.parametrize(
    ("fault", "committed"), [("lost-committed", True), ("lost-not-committed", False)]
)
def test_running_coordinator_resolves_its_own_in_doubt_transactions(
    world: World, fault: str, committed: bool
) -> None:
    """Without a restart, the coordinator fences the session, reads the marker and decides."""
    coord = world.coordinator()
    world.broker.fail("commit", fault)  # type: ignore[union-attr]
    with pytest.raises(TransactionInDoubt), coord.transaction() as tx:
        transfer()(tx)
    assert coord.in_doubt == [tx.gtrid]
    assert coord.resolve_in_doubt() == 1
    assert coord.in_doubt == [] and world.a.prepared == {} and world.b.prepared == {}
    assert (tx.gtrid in world.a.committed) is committed
    assert (tx.gtrid in world.b.committed) is committed
    coord.close()
    assert world.log.reopen().pending() == {} and world.mq.markers == set()


@pytest.mark.parametrize("interval", [0.2, None])
def test_watchdog_housekeeping_runs_every_interval_or_only_when_called(
    world: World, interval: float | None
) -> None:
    """The watchdog retries a deferred phase 2 every interval; with None, only a call does."""
    coord = world.coordinator(housekeeping_interval=interval)
    world.rb.fail("commit_prepared", "error", times=3)
    with coord.transaction() as tx:
        transfer()(tx)
    assert len(world.b.prepared) == 1
    if interval is not None:  # three failed retries, then the fourth commits
        deadline = time.monotonic() + 30
        while world.b.prepared and time.monotonic() < deadline:
            time.sleep(0.05)
        assert world.b.prepared == {}
    else:
        time.sleep(0.8)  # what four intervals of 0.2 s would have retried: nothing runs
        assert len(world.b.prepared) == 1
    assert coord.retry_deferred() == (0 if interval is not None else 1)
    assert tx.gtrid in world.b.committed and world.b.prepared == {}
    coord.close()


def test_in_doubt_stays_in_doubt_while_the_session_cannot_be_fenced(world: World) -> None:
    """If the broker cannot be fenced yet, nothing is decided and the branches stay prepared."""
    coord = world.coordinator()
    world.broker.fail("commit", "lost-committed")  # type: ignore[union-attr]
    with pytest.raises(TransactionInDoubt), coord.transaction() as tx:
        transfer()(tx)
    world.broker.fail("settle", "error")  # type: ignore[union-attr]
    assert coord.resolve_in_doubt() == 0
    assert coord.in_doubt == [tx.gtrid] and len(world.a.prepared) == 1
    assert coord.resolve_in_doubt() == 1 and world.a.prepared == {}


def test_an_unexpected_error_while_resolving_keeps_the_work_for_the_next_round(
    world: World,
) -> None:
    """A bug raising from a participant during a background retry is logged, and the
    transaction stays in the backlog: the next round of the watchdog finishes it."""
    coord = world.coordinator(housekeeping_interval=0.2)
    world.rb.fail("commit_prepared", "error", times=3)  # phase 2 of b is deferred
    calls = 0
    commit_recovered = world.rb.commit_recovered

    def first_call_breaks(xid: Xid) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in a participant")
        return commit_recovered(xid)

    world.rb.commit_recovered = first_call_breaks  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        with coord.transaction() as tx:
            transfer()(tx)
        deadline = time.monotonic() + 5.0
        while world.b.prepared and time.monotonic() < deadline:
            time.sleep(0.05)
    failed = [e for e in logs if e["event"] == events.RECOVERY_RESOLVE_FAILED]
    assert failed and "a bug in a participant" in failed[0]["error"]
    assert world.b.prepared == {} and tx.gtrid in world.b.committed and calls >= 2
    coord.close()


def test_an_unexpected_error_in_a_chore_leaves_the_watchdog_running(world: World) -> None:
    """A chore that raises is logged as tpc.housekeeping.failed; the watchdog thread goes on
    and its next round does the work."""
    coord = world.coordinator(housekeeping_interval=0.2)
    world.rb.fail("commit_prepared", "error", times=3)  # phase 2 of b is deferred
    breaks = FirstRoundBreaks(coord.backlog)
    with structlog.testing.capture_logs() as logs:
        with coord.transaction() as tx:
            transfer()(tx)
        deadline = time.monotonic() + 5.0
        while world.b.prepared and time.monotonic() < deadline:
            time.sleep(0.05)
    failed = [e for e in logs if e["event"] == events.HOUSEKEEPING_FAILED]
    assert failed and failed[0]["error"] == "RuntimeError: a bug in a chore"
    assert world.b.prepared == {} and tx.gtrid in world.b.committed and breaks.rounds >= 2
    coord.close()


def test_logging_that_raises_does_not_end_the_watchdog(
    world: World, logging_that_raises: list[str]
) -> None:
    """With every log call of the watchdog raising, late transactions are still timed out
    and a chore that failed is still retried by the next round."""
    coord = world.coordinator(timeout=0.3, housekeeping_interval=0.2)
    world.rb.fail("commit_prepared", "error", times=3)  # phase 2 of b is deferred
    breaks = FirstRoundBreaks(coord.backlog)
    with coord.transaction() as tx:
        transfer()(tx)
    for _ in range(2):  # the second shows the watchdog outlived the first one's log call
        with pytest.raises(TransactionAborted, match="timeout"), coord.transaction() as late:
            late.execute("a", "debit")
            deadline = time.monotonic() + 5.0
            while not late.timed_out and time.monotonic() < deadline:
                time.sleep(0.05)
        assert late.timed_out
    deadline = time.monotonic() + 5.0
    while world.b.prepared and time.monotonic() < deadline:
        time.sleep(0.05)
    assert world.b.prepared == {} and tx.gtrid in world.b.committed and breaks.rounds >= 2
    assert logging_that_raises.count(events.TIMEOUT) == 2
    assert events.HOUSEKEEPING_FAILED in logging_that_raises
    coord.close()


def test_a_filtered_debug_event_costs_the_commit_path_no_call(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With DEBUG filtered, the transaction and the commit sequence call no logger's debug:
    whether it passes is asked once, when the transaction's logger is bound."""
    calls: list[str] = []
    real_get_logger = events.get_logger

    class Spy:
        def __init__(self, inner: object) -> None:
            self._inner = inner

        def is_enabled_for(self, level: int) -> bool:
            return bool(self._inner.is_enabled_for(level))  # type: ignore[attr-defined]

        def bind(self, **bound: object) -> Spy:
            return Spy(self._inner.bind(**bound))  # type: ignore[attr-defined]

        def debug(self, event: str, **kw: object) -> None:
            calls.append(event)

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

    configure_logging("WARNING")
    monkeypatch.setattr(events, "get_logger", lambda **bound: Spy(real_get_logger(**bound)))
    coord = world.coordinator()
    with coord.transaction() as tx:
        transfer()(tx)
    assert tx.outcome is Outcome.COMMITTED
    assert calls == []
    configure_logging("DEBUG")
    with coord.transaction() as tx:
        transfer()(tx)
    assert events.BEGIN in calls and events.END in calls  # the spy does see them when asked
    configure_logging()
