"""Crash tests by state machine: random transactions, faults and crashes; recovery always agrees.

Hypothesis drives one coordinator at a time over fake databases ``a`` and
``b``, a fake broker ``mq`` and an in-memory decision log, all of which
outlive the coordinator as real servers and a real disk would. It begins
transactions of every shape, arms faults in participants and failpoints in
the coordinator, commits, rolls back, kills the process or the machine, tears
the log's tail, restarts (which recovers), and recovers again, possibly
crashing inside recovery. A model records what each caller was told.

Invariants, after every step:

* nothing a caller was told ABORTED is visible anywhere, nor has a marker;
* whatever is visible in one participant is visible or still prepared in
  every other participant the transaction wrote to (phase 2 may be pending,
  but nothing was rolled back that another participant committed);
* a COMMITTED transaction is committed or prepared everywhere it wrote;
* a marker exists only for a transaction whose messages were committed.

And after every recovery that resolved everything:

* every transaction is all-or-nothing across ``a``, ``b`` and the broker;
* every COMMITTED one is committed everywhere; IN_DOUBT ones are resolved;
* nothing of ours is prepared, no marker is left, the log has nothing pending.

``TWOPC_HYPOTHESIS_PROFILE=long`` runs many more and longer examples.
"""

from __future__ import annotations

import enum
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from coordinator import failpoints
from coordinator.aio import AsyncCoordinator
from coordinator.coordinator import Coordinator
from coordinator.errors import (
    CrashInjected,
    DuplicateGtrid,
    ParticipantUnavailable,
    TwoPhaseCommitError,
)
from coordinator.log.memory import MemoryDecisionLog
from coordinator.states import Outcome
from coordinator.transaction import Transaction
from participants.aio.fake import AsyncFakeBroker, AsyncFakeResource
from participants.fake import FakeBroker, FakeResource, FakeStore
from tests.aio_portal import BlockingCoordinator, Portal

COORDINATOR_ID = "t1"
PREFIX = COORDINATOR_ID + "."
DATABASES = ("a", "b")
QUEUE = "/queue/transfers.completed"

PROFILES = {
    "default": settings(max_examples=600, stateful_step_count=30, deadline=None),
    "long": settings(max_examples=5000, stateful_step_count=80, deadline=None),
}
PROFILE = os.environ.get("TWOPC_HYPOTHESIS_PROFILE", "default")
if PROFILE not in PROFILES:
    raise ValueError(f"TWOPC_HYPOTHESIS_PROFILE={PROFILE!r}; known profiles: {sorted(PROFILES)}")
# The long profile's 5,000 examples take minutes per machine on a loaded 2-core host:
# more than the suite's per-test timeout, which is for the default profile.
pytestmark = pytest.mark.timeout(3600 if PROFILE == "long" else 300)


class Told(enum.Enum):
    """What the caller of one transaction learnt."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_DOUBT = "in-doubt"
    NO_ANSWER = "no answer"  # the process died before answering (or before commit was asked)


TOLD = {
    Outcome.COMMITTED: Told.COMMITTED,
    Outcome.ABORTED: Told.ABORTED,
    Outcome.IN_DOUBT: Told.IN_DOUBT,
}


@dataclass
class Entry:
    """The model of one transaction: what it did and what its caller was told."""

    ops: dict[str, list[str]]  # database -> its writes ([] = a read-only branch)
    send: bool  # one business message on the broker
    told: Told | None = None  # None while the transaction is open

    @property
    def writers(self) -> list[str]:
        return [db for db, ops in self.ops.items() if ops]


@dataclass(frozen=True)
class Fault:
    """One fault to arm: on database a or b, on the broker mq, or a coordinator failpoint."""

    where: str  # "a", "b", "mq" or "coordinator"
    step: str  # the participant's step, or the failpoint's name
    action: str  # what the fake does there, or "raise" for a failpoint
    times: int = 1  # how many calls fail, or on which hit the failpoint fires


# Every fault a transaction or a recovery can meet, each equally likely: a fake database's
# step failing (or failing every retry), the broker's COMMIT going wrong, a failpoint.
DATABASE_FAULTS = [
    ("begin", "error", 1),
    ("prepare", "no", 1),
    ("prepare", "error", 1),
    ("prepare", "crash", 1),
    ("prepare", "crash-after", 1),
    ("commit_one_phase", "error", 1),
    ("commit_prepared", "error", 1),  # the retry succeeds
    ("commit_prepared", "error", 3),  # every retry fails: phase 2 deferred
    ("commit_prepared", "crash", 1),
    ("commit_prepared", "crash-after", 1),
    ("rollback", "error", 1),
    ("rollback", "crash", 1),
    ("commit_recovered", "error", 1),
    ("commit_recovered", "crash-after", 1),
    ("rollback_recovered", "error", 1),
    ("rollback_recovered", "crash", 1),
]
BROKER_ACTIONS = (
    "refuse",
    "lost-committed",
    "lost-not-committed",
    "in-flight",
    "error",
    "crash",
    "crash-after",
)
RECOVERY_FAILPOINTS = ("recovery_after_gather", "recovery_after_resolve_one")
FAULTS = st.sampled_from(
    [
        *(Fault(db, step, action, n) for db in DATABASES for step, action, n in DATABASE_FAULTS),
        *(Fault("mq", "commit", action) for action in BROKER_ACTIONS),
        *(Fault("coordinator", name, "raise", hit) for name in failpoints.NAMES for hit in (1, 2)),
    ]
)


@dataclass
class Seen:
    """What the servers hold of this machine's transactions, read at one moment."""

    committed: dict[str, dict[str, list[str]]]  # database -> gtrid -> its visible writes
    prepared: dict[str, set[str]]  # database -> gtrids with a branch prepared there
    messages: Counter[str] = field(default_factory=Counter)  # gtrid -> business messages
    markers: set[str] = field(default_factory=set)  # gtrids with a commit marker

    def visible(self, db: str, gtrid: str) -> list[str]:
        """``gtrid``'s writes visible in ``db`` ([] for none, or a read-only branch)."""
        return self.committed[db].get(gtrid, [])

    def gtrids(self) -> set[str]:
        found = set(self.messages) | self.markers
        for db in self.committed:
            found |= set(self.committed[db]) | self.prepared[db]
        return found


#: A fault drawn from the running machine's ``faults`` (subclasses bring their own).
THIS_MACHINES_FAULTS = st.runner().flatmap(lambda machine: machine.faults)

#: What a step returns when an injected crash killed the process during it.
DIED = object()

# A database's part in a new transaction: 1 or 2 writes (more often), untouched, read-only.
BRANCH_SHAPES = st.sampled_from([1, 2, 1, None, 0])


def bury(coordinator: Coordinator) -> None:
    """The process is gone: stop its threads, without any of close()'s clean-up."""
    if isinstance(coordinator, BlockingCoordinator):
        coordinator.bury()
        return
    coordinator._closed.set()
    coordinator._executor.shutdown(wait=True)


class CommitUnderCrashes(RuleBasedStateMachine):
    """One coordinator at a time over servers and a log that outlive it.

    The servers here are fakes; ``test_state_machine_lab`` runs the same
    rules and invariants on the lab's PostgreSQL and ActiveMQ by overriding
    the hooks marked below.
    """

    prefix = PREFIX
    queue = QUEUE
    faults = FAULTS  # what arm_fault and transfer draw from (the lab has its own)

    def __init__(self) -> None:
        super().__init__()
        failpoints.disarm()
        self.stores = {"a": FakeStore(), "b": FakeStore()}
        self.mq = FakeStore()
        self.log: Any = MemoryDecisionLog()
        self.coordinator: Coordinator | None = None
        self.resources: dict[str, Any] = {}
        self.broker: Any = None
        # "up": a coordinator runs; "dead": its process died (the log is as it left it).
        self.state = "dead"
        self.model: dict[str, Entry] = {}
        self.open: dict[str, Transaction] = {}
        self.counter = 0

    def teardown(self) -> None:
        failpoints.disarm()
        if self.coordinator is not None:
            self._bury()

    # -- hooks: the servers, the log and faults (overridden for the lab) ------------

    def _participants(self) -> tuple[list[Any], Any]:
        """New participant objects (a new process's) over the same servers."""
        resources = [FakeResource(db, self.stores[db]) for db in DATABASES]
        return resources, FakeBroker("mq", self.mq)

    def _bury(self) -> None:
        """The process is gone: its threads stop; it cleans nothing up."""
        assert self.coordinator is not None
        bury(self.coordinator)

    def _write(self, tx: Transaction, db: str, op: str) -> None:
        tx.execute(db, op)

    def _reopen_log(self, how: str) -> None:
        """The log as the next process finds it after the last one stopped ``how``."""
        if how == "machine":  # only forced records survive
            self.log = self.log.crash()
            return
        if how == "torn":  # the machine died mid-write: the last unforced records are lost
            torn = sum(self.log.tear_tail() for _ in range(2))
            event(f"torn records: {torn}")
        self.log = self.log.reopen()  # a process crash or clean stop: everything written

    def _arm(self, fault: Fault) -> None:
        if fault.where == "coordinator":
            failpoints.arm(fault.step, fault.action, on_hit=fault.times)
        elif fault.where == "mq":
            assert self.broker is not None
            self.broker.fail(fault.step, fault.action, fault.times)
        else:
            self.resources[fault.where].fail(fault.step, fault.action, fault.times)

    def look(self) -> Seen:
        """What the servers hold now."""
        seen = Seen(
            committed={db: dict(s.committed) for db, s in self.stores.items()},
            prepared={
                db: {x.gtrid for x in s.prepared if x.bqual == db} for db, s in self.stores.items()
            },
            markers={m for m in self.mq.markers if m.startswith(self.prefix)},
        )
        seen.messages.update(h["gtrid"] for _, _, h in self.mq.messages)
        return seen

    # -- helpers -----------------------------------------------------------------

    def _died(self) -> None:
        """The coordinator process died: whoever was waiting gets no answer."""
        for gtrid in self.open:
            self.model[gtrid].told = Told.NO_ANSWER
        self.open.clear()
        if self.coordinator is not None:
            self._bury()
        self.coordinator = None
        self.state = "dead"

    def _guarded(self, step: Callable[[], Any]) -> Any:
        """Run ``step``; an injected crash anywhere in it kills the process (returns DIED)."""
        try:
            return step()
        except CrashInjected as crash:
            event(f"crash: {crash}")
            self._died()
            return DIED

    def _recover(self) -> None:
        assert self.coordinator is not None
        if self.open:
            with pytest.raises(TwoPhaseCommitError, match="recovery needs the coordinator idle"):
                self.coordinator.recover()
            return
        report = self._guarded(self.coordinator.recover)
        if report is DIED:
            return
        event(f"recovery: {len(report.items)} in doubt, resolved={report.resolved}")
        if report.resolved:
            self.check_recovered()

    # -- starting and stopping -----------------------------------------------------

    @initialize()
    def first_start(self) -> None:
        """The first coordinator, on empty servers and an empty log."""
        self._start()

    def _start(self) -> None:
        """A new coordinator over the same servers and log; it recovers first."""
        resources, self.broker = self._participants()
        self.resources = {r.name: r for r in resources}
        # recover_on_start=False and recover() below is what the constructor does; done
        # in two steps so a crash inside recovery leaves an object whose threads we stop.
        self.coordinator = self._new_coordinator(resources, self.broker)
        self.coordinator.config.phase2_backoff = 0.0
        self.state = "up"
        self._recover()

    def _new_coordinator(self, resources: list[Any], broker: Any) -> Any:
        """A coordinator of the API under test (the asyncio subclass below swaps it)."""
        return Coordinator(
            self.prefix[:-1],
            self.log,
            resources,
            broker,
            recover_on_start=False,
            housekeeping_interval=None,  # the housekeeping rule runs the chores: reproducible
        )

    @precondition(lambda self: self.state == "up")
    @rule(how=st.sampled_from(["close", "process", "machine"]))
    def restart(self, how: str) -> None:
        """Stop the coordinator (cleanly, by killing it, or by power loss) and start anew."""
        assert self.coordinator is not None
        if how == "close":
            if self._guarded(self.coordinator.close) is DIED:
                return
            self.coordinator = None
        self._died()  # whoever waits on a transaction still open gets no answer
        self._reopen_log(how)
        self._start()

    @precondition(lambda self: self.state == "dead")
    @rule(how=st.sampled_from(["process", "machine", "torn"]))
    def restart_after_crash(self, how: str) -> None:
        """After a crash, the process (or the machine, maybe mid-write) restarts and recovers."""
        self._reopen_log(how)
        self._start()

    # -- transactions ----------------------------------------------------------------

    def _begin(self, a: int | None, b: int | None, send: bool) -> str | None:
        """Begin a transaction and do its work; its gtrid, or None if it ended already."""
        assert self.coordinator is not None
        self.counter += 1
        gtrid = f"{self.prefix}{self.counter:04d}"
        shape = {"a": a, "b": b}
        entry = Entry({db: [] for db, n in shape.items() if n is not None}, send)
        for db, n in shape.items():
            entry.ops.get(db, []).extend(f"{gtrid}/{db}/{i}" for i in range(n or 0))
        tx = self.coordinator.begin(gtrid)
        self.model[gtrid] = entry
        self.open[gtrid] = tx

        def work() -> None:
            for db, ops in entry.ops.items():
                tx.branch(db)
                for op in ops:
                    self._write(tx, db, op)
            if send:
                tx.send(self.queue, f"transfer {gtrid}", {"gtrid": gtrid})

        try:
            if self._guarded(work) is DIED:
                return None
        except ParticipantUnavailable:  # a database refused the branch: the caller gives up
            self.open.pop(gtrid)
            entry.told = Told.NO_ANSWER
            outcome = self._guarded(tx.rollback)
            if outcome is not DIED:
                entry.told = TOLD[outcome]
            return None
        return gtrid

    def _commit(self, gtrid: str) -> None:
        tx = self.open.pop(gtrid)
        entry = self.model[gtrid]
        entry.told = Told.NO_ANSWER
        outcome = self._guarded(tx.commit)
        if outcome is not DIED:
            entry.told = TOLD[outcome]
            event(f"told {outcome.value}: {len(entry.writers)} writers, send={entry.send}")

    @precondition(lambda self: self.state == "up")
    @rule(a=BRANCH_SHAPES, b=BRANCH_SHAPES, send=st.booleans(), fault=THIS_MACHINES_FAULTS)
    def transfer(self, a: int | None, b: int | None, send: bool, fault: Fault) -> None:
        """Arm a fault, then begin, work and commit at once."""
        self._arm(fault)
        gtrid = self._begin(a, b, send)
        if gtrid is not None:
            self._commit(gtrid)

    @precondition(lambda self: self.state == "up")
    @rule(a=BRANCH_SHAPES, b=BRANCH_SHAPES, send=st.booleans())
    def begin(self, a: int | None, b: int | None, send: bool) -> None:
        """Begin a transaction and do its work, leaving it open."""
        self._begin(a, b, send)

    @precondition(lambda self: self.state == "up" and self.open)
    @rule(index=st.integers(min_value=0, max_value=5))
    def commit(self, index: int) -> None:
        """Commit an open transaction; an injected crash kills the process."""
        self._commit(sorted(self.open)[index % len(self.open)])

    @precondition(lambda self: self.state == "up" and self.open)
    @rule(index=st.integers(min_value=0, max_value=5))
    def rollback(self, index: int) -> None:
        """The caller rolls an open transaction back."""
        gtrid = sorted(self.open)[index % len(self.open)]
        tx = self.open.pop(gtrid)
        entry = self.model[gtrid]
        entry.told = Told.NO_ANSWER
        outcome = self._guarded(tx.rollback)
        if outcome is not DIED:
            assert outcome is Outcome.ABORTED
            entry.told = Told.ABORTED

    # -- faults --------------------------------------------------------------------------

    @precondition(lambda self: self.state == "up")
    @rule(fault=THIS_MACHINES_FAULTS)
    def arm_fault(self, fault: Fault) -> None:
        """A participant step or a coordinator failpoint will fail or crash when next reached."""
        self._arm(fault)

    @precondition(lambda self: self.state == "dead")
    @rule(name=st.sampled_from(failpoints.NAMES), on_hit=st.integers(min_value=1, max_value=2))
    def arm_failpoint_before_restart(self, name: str, on_hit: int) -> None:
        """A failpoint armed before the restart (its recovery may pass it first)."""
        failpoints.arm(name, "raise", on_hit=on_hit)

    # -- recovery and housekeeping --------------------------------------------------------

    @precondition(lambda self: self.state == "up")
    @rule(
        crash_at=st.sampled_from([None, None, *RECOVERY_FAILPOINTS]),
        on_hit=st.integers(min_value=1, max_value=3),
    )
    def recover(self, crash_at: str | None, on_hit: int) -> None:
        """Recovery on demand (refused while busy), maybe crashing part way; idempotent."""
        if crash_at is not None:
            failpoints.arm(crash_at, "raise", on_hit=on_hit)
        self._recover()
        if crash_at is not None:
            failpoints.disarm(crash_at)  # it did not get that far: nothing was in doubt

    @precondition(lambda self: self.state == "up")
    @rule(
        chore=st.sampled_from(
            ["sweep_markers", "retry_deferred", "retry_rollbacks", "resolve_in_doubt"]
        )
    )
    def housekeeping(self, chore: str) -> None:
        """A chore of the watchdog: sweep markers, retry phase 2 or rollbacks, settle in-doubt."""
        assert self.coordinator is not None
        self._guarded(getattr(self.coordinator, chore))

    # -- invariants --------------------------------------------------------------------------

    def committed(self, seen: Seen, db: str, gtrid: str) -> bool:
        """Whether ``gtrid``'s writes are visible in database ``db`` (exactly them)."""
        ops = seen.visible(db, gtrid)
        if not ops:  # absent, or a read-only branch's empty one-phase commit
            return False
        assert sorted(ops) == sorted(self.model[gtrid].ops.get(db, [])), (
            f"{gtrid}: {db} holds {ops}"
        )
        return True

    @invariant()
    def servers_agree_with_what_callers_were_told(self) -> None:
        """Read the servers once, then check every transaction against the model."""
        seen = self.look()
        self.nothing_is_half_undone(seen)
        self.every_gtrid_in_the_servers_is_known(seen)

    def nothing_is_half_undone(self, seen: Seen) -> None:
        """Visible somewhere => visible or prepared everywhere; ABORTED is visible nowhere."""
        for gtrid, entry in self.model.items():
            messages = seen.messages[gtrid]
            marker = gtrid in seen.markers
            assert messages <= int(entry.send), f"{gtrid}: {messages} messages"
            for db in DATABASES:
                if db not in entry.writers:
                    assert not self.committed(seen, db, gtrid), f"{gtrid}: wrote nothing to {db}"
                    assert gtrid not in seen.prepared[db], f"{gtrid}: {db} prepared, read-only"
            visible = messages > 0 or any(self.committed(seen, db, gtrid) for db in entry.writers)
            if visible or entry.told is Told.COMMITTED:
                for db in entry.writers:
                    assert self.committed(seen, db, gtrid) or gtrid in seen.prepared[db], (
                        f"{gtrid} ({entry.told}): visible elsewhere, gone from {db}"
                    )
                assert messages == int(entry.send), f"{gtrid} ({entry.told}): message missing"
            if marker:
                assert entry.send and messages == 1, f"{gtrid}: marker without its message"
            if entry.told is Told.ABORTED:
                assert not visible and not marker, f"{gtrid} was ABORTED but is visible"

    def every_gtrid_in_the_servers_is_known(self, seen: Seen) -> None:
        """The servers hold nothing the model does not know (no stray or renamed branch)."""
        assert seen.gtrids() <= set(self.model), seen.gtrids() - set(self.model)

    def check_recovered(self) -> None:
        """After a recovery that resolved everything: all-or-nothing, nothing left over."""
        assert self.coordinator is not None
        seen = self.look()
        for db, prepared in seen.prepared.items():
            assert not prepared, f"still prepared in {db} after recovery: {sorted(prepared)}"
        assert not seen.markers, f"markers left over: {sorted(seen.markers)}"
        assert self.log.pending() == {}, "the log still has COMMITs without END"
        for gtrid, entry in self.model.items():
            parts = [self.committed(seen, db, gtrid) for db in entry.writers]
            if entry.send:
                parts.append(seen.messages[gtrid] == 1)
            assert len(set(parts)) <= 1, f"{gtrid} ({entry.told}) is half committed: {parts}"
            if entry.told is Told.COMMITTED:
                assert all(parts), f"{gtrid} was COMMITTED but is not everywhere"
            if entry.told is Told.ABORTED:
                assert not any(parts), f"{gtrid} was ABORTED but is visible"


CommitUnderCrashes.TestCase.settings = PROFILES[PROFILE]
TestCommitUnderCrashes = CommitUnderCrashes.TestCase


class AsyncAPI:
    """Mixin: the machine's coordinator is coordinator.aio.AsyncCoordinator, run from the
    sync rules through a portal (tests/aio_portal.py); same rules, same invariants."""

    portal: Portal | None = None

    def _new_coordinator(self, resources: list[Any], broker: Any) -> Any:
        if self.portal is None:
            self.portal = Portal()
        if isinstance(broker, FakeBroker):  # the fakes behind the asyncio protocols
            resources = [AsyncFakeResource(r) for r in resources]
            broker = AsyncFakeBroker(broker)
        coordinator = AsyncCoordinator(
            self.prefix[:-1],  # type: ignore[attr-defined]
            self.log,  # type: ignore[attr-defined]
            resources,
            broker,
            recover_on_start=False,
            housekeeping_interval=None,
        )
        return BlockingCoordinator(self.portal, coordinator)

    def teardown(self) -> None:
        try:
            super().teardown()  # type: ignore[misc]
        finally:
            if self.portal is not None:
                self.portal.close()


class AsyncCommitUnderCrashes(AsyncAPI, CommitUnderCrashes):
    """The same rules and invariants, run against coordinator.aio.AsyncCoordinator."""


AsyncCommitUnderCrashes.TestCase.settings = PROFILES[PROFILE]
TestAsyncCommitUnderCrashes = AsyncCommitUnderCrashes.TestCase


# -- minimal reproductions of known bugs ----------------------------------------------------------


@pytest.fixture
def disarmed() -> Iterator[None]:
    """No failpoint armed before or after the test."""
    failpoints.disarm()
    yield
    failpoints.disarm()


def watchdogs() -> set[threading.Thread]:
    """The coordinators' watchdog threads alive now."""
    return {t for t in threading.enumerate() if t.name == "twopc-watchdog"}


def test_failed_recovery_at_start_leaves_no_thread_behind(disarmed: None) -> None:
    """A coordinator whose recovery at start fails does not leave its watchdog thread running."""
    before = watchdogs()
    failpoints.arm("recovery_after_gather", "raise")
    with pytest.raises(CrashInjected):
        Coordinator(COORDINATOR_ID, MemoryDecisionLog(), [FakeResource("a")], FakeBroker("mq"))
    started = watchdogs() - before
    for thread in started:
        thread.join(timeout=0.5)  # it wakes every 0.2 s: time enough to see it was stopped
    assert not [t for t in started if t.is_alive()]


def test_reused_gtrid_is_not_committed_by_the_marker_of_its_earlier_use(disarmed: None) -> None:
    """A gtrid reused before its old marker is swept is refused, or never committed by it."""
    a, b, mq = FakeStore(), FakeStore(), FakeStore()
    log = MemoryDecisionLog()

    def coordinator(log: MemoryDecisionLog) -> Coordinator:
        resources = [FakeResource("a", a), FakeResource("b", b)]
        return Coordinator(COORDINATOR_ID, log, resources, FakeBroker("mq", mq))

    first = coordinator(log)
    for attempt in ("first", "second"):
        try:
            tx = first.begin(f"{PREFIX}reused")
        except DuplicateGtrid:
            assert attempt == "second"
            return  # refused while its marker may still be on the queue: fixed
        tx.execute("a", attempt)
        tx.execute("b", attempt)
        tx.send(QUEUE, attempt, {"gtrid": tx.gtrid})
        if attempt == "second":
            failpoints.arm("before_broker_commit", "raise")
        try:
            assert tx.commit() is Outcome.COMMITTED
        except CrashInjected:
            bury(first)
    coordinator(log.reopen()).close()  # recovery: the second use never reached its commit point
    assert a.committed[f"{PREFIX}reused"] == ["first"]
    assert [body for _, body, _ in mq.messages] == ["first"]


def test_marker_of_a_transaction_finished_by_retry_is_swept_on_close(disarmed: None) -> None:
    """A transaction whose phase 2 was retried to completion leaves no marker after close()."""
    mq = FakeStore()
    b = FakeResource("b")
    coordinator = Coordinator(
        COORDINATOR_ID, MemoryDecisionLog(), [FakeResource("a"), b], FakeBroker("mq", mq)
    )
    coordinator.config.phase2_backoff = 0.0
    b.fail("commit_prepared", "error", times=3)  # every attempt fails: phase 2 deferred
    tx = coordinator.begin()
    tx.execute("a", "debit")
    tx.execute("b", "credit")
    tx.send(QUEUE, "transfer")
    assert tx.commit() is Outcome.COMMITTED
    coordinator.close()  # retries phase 2, then sweeps the markers of what ended
    assert tx.gtrid in b.store.committed
    assert mq.markers == set()
