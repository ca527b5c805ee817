"""In-memory participants that can fail or crash at any step: for the state machine's tests.

A :class:`FakeStore` is the "durable" side of a fake database or broker: it
outlives a simulated coordinator crash, as a real server would. Faults are
armed per step with :meth:`FakeResource.fail` / :meth:`FakeBroker.fail`:

* ``"error"``  the call raises ParticipantError (ParticipantUnavailable)
* ``"no"``     prepare votes NO (PrepareFailed)
* ``"wait"``   prepare waits, as work sent with the PREPARE waits for a lock, until
  the branch's ``cancel`` (the timeout watchdog), then votes NO
* ``"crash"``  the call raises CrashInjected before doing anything
* ``"crash-after"``  the call takes effect, then CrashInjected
* broker commit only: ``"refuse"`` (ERROR: CommitRefused, nothing committed),
  ``"lost-committed"`` (committed, but OutcomeUnknown), ``"lost-not-committed"``,
  ``"in-flight"`` (the COMMIT went out but the broker has not processed it yet:
  OutcomeUnknown, and nothing of it, marker included, is visible until the
  session is fenced: :meth:`FakeBroker.fence` or :meth:`FakeBroker.settle`)
* a branch's ``commit_one_phase``: ``"refuse"`` (CommitRefused, nothing committed),
  ``"lost-committed"`` (committed, but the answer lost: ParticipantUnavailable),
  ``"in-flight"`` (no answer: ParticipantUnavailable, and the server commits only
  when that session ends: :meth:`FakeResource.end_sessions`)

:class:`FakeDecisionTable` keeps decision rows in a fake database: a row is
there once the branch it was written in committed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, LiteralString

from coordinator.errors import (
    CommitRefused,
    CrashInjected,
    OutcomeUnknown,
    ParticipantError,
    ParticipantUnavailable,
    PrepareFailed,
)
from coordinator.protocol import AsyncXABranch, XABranch, no_callback
from coordinator.states import Vote
from coordinator.xid import Xid
from participants.stomp_headers import message_headers


class _NoRows:
    """What a fake branch's execute returns: a cursor with no rows."""

    def fetchone(self) -> None:
        return None


@dataclass
class InFlightCommit:
    """A broker COMMIT sent on a connection the broker has not caught up with yet.

    A real broker processes a connection's frames in order; a dead session's
    COMMIT may still be on its way, and lands once the broker has read every
    frame of that connection: at the latest when its client-id is taken over.
    """

    gtrid: str
    messages: list[tuple[str, str, dict[str, str]]]
    acks: list[str]
    marker: str | None


@dataclass
class FakeStore:
    """What a fake server keeps across coordinator crashes."""

    committed: dict[str, list[str]] = field(default_factory=dict)  # gtrid -> ops
    prepared: dict[Xid, list[str]] = field(default_factory=dict)
    rolled_back: set[str] = field(default_factory=set)
    markers: set[str] = field(default_factory=set)
    in_flight: list[InFlightCommit] = field(default_factory=list)  # broker: sent, unprocessed
    messages: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # broker
    acked: list[str] = field(default_factory=list)  # broker: ack ids consumed by a commit
    live_holder: bool = False  # broker: a paused coordinator still holds its client-ids
    forgotten_rows: set[str] = field(default_factory=set)  # decision rows deleted
    # database: one-phase commits sent, not processed while their session lives (gtrid -> ops)
    unanswered_commits: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


#: How long a prepare armed with ``wait`` waits to be cancelled before it fails the test.
CANCEL_WAIT = 10.0


class _Faults:
    def __init__(self) -> None:
        self._armed: dict[str, list[str]] = {}

    def arm(self, step: str, action: str, times: int = 1) -> None:
        self._armed.setdefault(step, []).extend([action] * times)

    def take(self, step: str) -> str | None:
        queue = self._armed.get(step)
        return queue.pop(0) if queue else None


def _raise_for(action: str | None, step: str, name: str, gtrid: str) -> None:
    if action == "crash":
        raise CrashInjected(f"fake {name}: crash at {step}")
    if action == "error":
        raise ParticipantUnavailable(f"fake failure at {step}", participant=name, gtrid=gtrid)


class _FakeServer:
    """What a fake database and a fake broker share: a name, a store, armed faults."""

    def __init__(self, name: str, store: FakeStore | None = None) -> None:
        self._name = name
        self.store = store or FakeStore()
        self.faults = _Faults()

    @property
    def name(self) -> str:
        return self._name

    def fail(self, step: str, action: str, times: int = 1) -> None:
        """Arm a fault at ``step`` (begin, prepare, commit_prepared, commit, fence, ...)."""
        self.faults.arm(step, action, times)


class FakeResource(_FakeServer):
    """A fake database that can prepare (an XAResource)."""

    def begin(self, xid: Xid) -> FakeBranch:
        _raise_for(self.faults.take("begin"), "begin", self._name, xid.gtrid)
        return FakeBranch(self, xid)

    def recover(self, format_id: int, gtrid_prefix: str) -> dict[Xid, datetime | None]:
        _raise_for(self.faults.take("recover"), "recover", self._name, "")
        with self.store.lock:
            return {
                x: None
                for x in self.store.prepared
                if x.format_id == format_id and x.gtrid.startswith(gtrid_prefix)
            }

    def _finish(self, xid: Xid, commit: bool, step: str) -> bool:
        action = self.faults.take(step)
        _raise_for(action, step, self._name, xid.gtrid)
        with self.store.lock:
            ops = self.store.prepared.pop(xid, None)
            if ops is not None:
                if commit:
                    self.store.committed[xid.gtrid] = ops
                else:
                    self.store.rolled_back.add(xid.gtrid)
        if action == "crash-after":
            raise CrashInjected(f"fake {self._name}: crash after {step}")
        return ops is not None

    def end_sessions(self, gtrid_prefix: str) -> None:
        """The sessions of the gtrids with this prefix end (they are fenced): the server
        finishes what they sent, so a commit still in flight lands."""
        with self.store.lock:
            for gtrid in [g for g in self.store.unanswered_commits if g.startswith(gtrid_prefix)]:
                self.store.committed[gtrid] = self.store.unanswered_commits.pop(gtrid)

    def commit_recovered(self, xid: Xid) -> bool:
        return self._finish(xid, True, "commit_recovered")

    def rollback_recovered(self, xid: Xid) -> bool:
        return self._finish(xid, False, "rollback_recovered")

    def close(self) -> None:
        pass


class FakeBranch:
    """One branch of a fake database: records operations, prepares into the store."""

    def __init__(self, resource: FakeResource, xid: Xid) -> None:
        self.resource = resource
        self._xid = xid
        self.ops: list[str] = []
        self.failure: BaseException | None = None
        self.left_prepared = False
        self.state = "active"
        self._cancelled = threading.Event()

    @property
    def name(self) -> str:
        return self.resource.name

    @property
    def xid(self) -> Xid:
        return self._xid

    def execute(self, op: object, params: object = None) -> Any:
        """Record one write; returns a cursor with no rows. The decision row (docs/design.md §3)
        takes the resource's ``mark`` fault first."""
        if op == DECISION_ROW:
            _raise_for(self.resource.faults.take("mark"), "mark", self.name, self._xid.gtrid)
        self.ops.append(str(op))
        return _NoRows()

    def read_only(self) -> bool:
        return not self.ops and self.failure is None

    def _fault(self, step: str) -> str | None:
        action = self.resource.faults.take(step)
        _raise_for(action, step, self.name, self._xid.gtrid)
        return action

    def send_prepare(self) -> None:
        """Nothing goes out ahead: :meth:`prepare` does the whole of phase 1."""

    def prepare(self) -> Vote:
        action = self._fault("prepare")
        if action == "wait":  # work sent with the PREPARE waits for a lock until cancelled
            if not self._cancelled.wait(CANCEL_WAIT):
                raise AssertionError(f"fake {self.name}: prepare waited, nothing cancelled it")
            self.state = "rolled back"
            raise PrepareFailed(
                "canceling statement due to user request",
                participant=self.name,
                gtrid=self._xid.gtrid,
            )
        if action == "no" or self.failure is not None:
            self.state = "rolled back"
            raise PrepareFailed("voted NO", participant=self.name, gtrid=self._xid.gtrid)
        with self.resource.store.lock:
            self.resource.store.prepared[self._xid] = list(self.ops)
        self.state = "prepared"
        if action == "crash-after":
            raise CrashInjected(f"fake {self.name}: crash after prepare")
        return Vote.YES

    def commit_one_phase(self) -> None:
        action = self._fault("commit_one_phase")
        if action == "refuse":
            self.state = "rolled back"
            raise CommitRefused("COMMIT refused", participant=self.name, gtrid=self._xid.gtrid)
        if action == "in-flight":
            with self.resource.store.lock:
                self.resource.store.unanswered_commits[self._xid.gtrid] = list(self.ops)
            raise ParticipantUnavailable(
                "no answer to COMMIT: still in flight", participant=self.name, gtrid=self._xid.gtrid
            )
        with self.resource.store.lock:
            self.resource.store.committed[self._xid.gtrid] = list(self.ops)
        self.state = "committed"
        if action == "lost-committed":
            raise ParticipantUnavailable(
                "the answer to COMMIT was lost", participant=self.name, gtrid=self._xid.gtrid
            )

    def send_commit_prepared(self) -> None:
        """Nothing goes out ahead: :meth:`commit_prepared` does the whole of phase 2."""

    def commit_prepared(self) -> None:
        action = self._fault("commit_prepared")
        if not self.resource._finish(self._xid, True, "commit_prepared.inner"):
            raise ParticipantError(
                "no prepared branch", participant=self.name, gtrid=self._xid.gtrid
            )
        self.state = "committed"
        if action == "crash-after":
            raise CrashInjected(f"fake {self.name}: crash after commit_prepared")

    def rollback(self) -> None:
        try:
            self._fault("rollback")
        except ParticipantError:
            self.left_prepared = self.state == "prepared"  # rolled back by xid later
            return
        with self.resource.store.lock:
            if self.resource.store.prepared.pop(self._xid, None) is not None or self.ops:
                self.resource.store.rolled_back.add(self._xid.gtrid)
        self.state = "rolled back"
        self.left_prepared = False

    def cancel(self) -> None:
        """End a ``wait`` armed at prepare (the only step of a fake that runs until cancelled)."""
        self._cancelled.set()

    def release(self) -> None:
        pass


class FakeBroker(_FakeServer):
    """A fake broker that commits last, with markers (a LastResource)."""

    def __init__(self, name: str = "mq", store: FakeStore | None = None) -> None:
        super().__init__(name, store)

    def begin(self, gtrid: str) -> FakeBrokerSession:
        _raise_for(self.faults.take("begin"), "begin", self._name, gtrid)
        return FakeBrokerSession(self, gtrid)

    def fence(self, timeout: float) -> None:
        _raise_for(self.faults.take("fence"), "fence", self._name, "")
        if self.store.live_holder:
            raise ParticipantError(
                "a live coordinator still holds its client-ids", participant=self._name
            )
        self._land_in_flight(None)

    def settle(self, session: object, timeout: float) -> None:
        _raise_for(self.faults.take("settle"), "settle", self._name, "")
        self._land_in_flight(session.gtrid if isinstance(session, FakeBrokerSession) else None)

    def _land_in_flight(self, gtrid: str | None) -> None:
        """The broker processes the COMMITs in flight (of ``gtrid``'s session, or all):
        a fenced session has nothing left on its way."""
        with self.store.lock:
            landing = [c for c in self.store.in_flight if gtrid is None or c.gtrid == gtrid]
            for commit in landing:
                self.store.in_flight.remove(commit)
                self.store.messages.extend(commit.messages)
                self.store.acked.extend(commit.acks)
                if commit.marker is not None:
                    self.store.markers.add(commit.marker)

    def markers(self) -> set[str]:
        _raise_for(self.faults.take("markers"), "markers", self._name, "")
        with self.store.lock:
            return set(self.store.markers)

    def remove_markers(self, gtrids: Collection[str]) -> int:
        _raise_for(self.faults.take("remove_markers"), "remove_markers", self._name, "")
        with self.store.lock:
            present = self.store.markers & set(gtrids)
            self.store.markers -= present
        return len(present)

    def close(self) -> None:
        pass


class FakeBrokerSession:
    """A fake broker transaction."""

    def __init__(self, broker: FakeBroker, gtrid: str) -> None:
        self.broker = broker
        self.gtrid = gtrid
        self.pending: list[tuple[str, str, dict[str, str]]] = []
        self.pending_acks: list[str] = []

    @property
    def name(self) -> str:
        return self.broker.name

    @property
    def has_work(self) -> bool:
        return bool(self.pending or self.pending_acks)

    def send(self, destination: str, body: str, headers: Mapping[str, str] | None = None) -> None:
        """Keep the message, its headers checked and stamped as ActiveMQ's sessions do."""
        stamped = message_headers(
            destination, body, headers, gtrid=self.gtrid, participant=self.name
        )
        self.pending.append((destination, body, stamped))

    def ack(self, ack_id: str) -> None:
        _raise_for(self.broker.faults.take("ack"), "ack", self.name, self.gtrid)
        self.pending_acks.append(ack_id)

    def send_ahead(self) -> None:
        """Nothing to do: the fake's messages are applied at its commit only."""

    def _commit(self, marker: str | None) -> str | None:
        """Commit; the armed action, which :meth:`_answer` turns into the caller's answer."""
        action = self.broker.faults.take("commit")
        _raise_for(action, "commit", self.name, self.gtrid)
        if action == "refuse":
            raise CommitRefused("ERROR frame", participant=self.name, gtrid=self.gtrid)
        if action == "lost-not-committed":
            raise OutcomeUnknown("no RECEIPT", participant=self.name, gtrid=self.gtrid)
        if action == "in-flight":
            commit = InFlightCommit(self.gtrid, list(self.pending), list(self.pending_acks), marker)
            with self.broker.store.lock:
                self.broker.store.in_flight.append(commit)
            return action
        with self.broker.store.lock:
            self.broker.store.messages.extend(self.pending)
            self.broker.store.acked.extend(self.pending_acks)
            if marker is not None:
                self.broker.store.markers.add(marker)
        if action == "lost-committed":
            raise OutcomeUnknown("no RECEIPT", participant=self.name, gtrid=self.gtrid)
        if action == "crash-after":
            raise CrashInjected("fake broker: crash after commit")
        return action

    def _answer(self, action: str | None) -> None:
        """The RECEIPT of a COMMIT that went out: none for one still in flight."""
        if action == "in-flight":
            raise OutcomeUnknown(
                "no RECEIPT: the COMMIT is still in flight", participant=self.name, gtrid=self.gtrid
            )

    def commit_with_marker(
        self,
        gtrid: str,
        timeout: float,
        *,
        before_commit: Callable[[], None] = no_callback,
        commit_sent: Callable[[], None] = no_callback,
    ) -> None:
        before_commit()
        action = self._commit(gtrid)
        commit_sent()  # sent (committed, or in flight); the receipt is "not yet seen"
        self._answer(action)

    def commit(self, timeout: float) -> None:
        self._answer(self._commit(None))

    def abort(self) -> None:
        self.pending = []
        self.pending_acks = []

    def release(self) -> None:
        pass


#: The operation a decision row is in a fake branch.
DECISION_ROW: LiteralString = "decision-row"


class FakeDecisionTable:
    """Decision rows in fake database ``resource`` (a DecisionHolder): a gtrid has a row
    when a branch of it that was marked (:meth:`mark`) committed, until :meth:`forget`."""

    def __init__(self, resource: FakeResource) -> None:
        self.resource = resource
        self.settled: list[str] = []

    @property
    def participant(self) -> str:
        return self.resource.name

    def mark(self, branch: XABranch, gtrid: str) -> None:
        """The row, as an operation of ``branch`` (a fake session has no pid to keep)."""
        branch.execute(DECISION_ROW, (gtrid,))

    async def amark(self, branch: AsyncXABranch, gtrid: str) -> None:
        """:meth:`mark` inside an asyncio branch."""
        await branch.execute(DECISION_ROW, (gtrid,))

    def decided(self, gtrid_prefix: str) -> set[str]:
        store = self.resource.store
        with store.lock:
            return {
                gtrid
                for gtrid, ops in store.committed.items()
                if gtrid.startswith(gtrid_prefix)
                and DECISION_ROW in ops
                and gtrid not in store.forgotten_rows
            }

    def settle(self, gtrid: str, timeout: float) -> None:
        """End the session that carried ``gtrid``'s row: its commit in flight, if any, lands."""
        _raise_for(self.resource.faults.take("settle"), "settle", self.participant, gtrid)
        self.resource.end_sessions(gtrid)
        self.settled.append(gtrid)

    def forget(self, gtrids: Collection[str]) -> int:
        present = self.decided("") & set(gtrids)
        with self.resource.store.lock:
            self.resource.store.forgotten_rows |= present
        return len(present)

    def close(self) -> None:
        pass
