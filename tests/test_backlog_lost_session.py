"""The backlog ends a branch's lost session before it retries the branch's rollback by xid
(docs/design.md §2, "A PREPARE behind work that waits"), on the fakes: in that order, again
next round when the session could not be ended, and not where there is none to end."""

from __future__ import annotations

from coordinator.backlog import Backlog
from coordinator.errors import ParticipantUnavailable
from coordinator.log.memory import MemoryDecisionLog
from coordinator.xid import Xid
from participants.fake import FakeResource
from participants.pg_session import ServerSession


class SessionEndingResource(FakeResource):
    """A fake database whose lost sessions can be ended: fails the first ``failures`` times,
    and records each call and each rollback by xid."""

    def __init__(self, name: str, failures: int = 0) -> None:
        super().__init__(name)
        self.failures = failures
        self.calls: list[tuple[str, object]] = []

    def end_lost_session(self, session: ServerSession, xid: Xid) -> None:
        self.calls.append(("end", session.pid))
        if self.failures:
            self.failures -= 1
            raise ParticipantUnavailable("unreachable", participant=self.name, gtrid=xid.gtrid)

    def rollback_recovered(self, xid: Xid) -> bool:
        self.calls.append(("rollback", xid.gtrid))
        return super().rollback_recovered(xid)


def test_the_lost_session_is_ended_before_the_rollback_is_retried() -> None:
    """A missed rollback naming a lost session: the session is ended, then the branch is
    rolled back by its xid, and nothing is left for the next round."""
    a = SessionEndingResource("a")
    backlog = Backlog({"a": a}, MemoryDecisionLog(), None)
    backlog.missed_rollback("a", Xid.branch("g-1", "a"), lost_session=ServerSession(4242, "c1"))
    assert backlog.retry_rollbacks() == 1
    assert a.calls == [("end", 4242), ("rollback", "g-1")]
    assert backlog.retry_rollbacks() == 0
    assert a.calls == [("end", 4242), ("rollback", "g-1")]


def test_a_session_that_cannot_be_ended_keeps_the_rollback_for_the_next_round() -> None:
    """While the lost session cannot be ended, no rollback by xid is tried (it could find
    nothing before the PREPARE runs); the next round ends it, then rolls back."""
    a = SessionEndingResource("a", failures=1)
    backlog = Backlog({"a": a}, MemoryDecisionLog(), None)
    backlog.missed_rollback("a", Xid.branch("g-2", "a"), lost_session=ServerSession(77, "c1"))
    assert backlog.retry_rollbacks() == 0
    assert a.calls == [("end", 77)]
    assert backlog.retry_rollbacks() == 1
    assert a.calls == [("end", 77), ("end", 77), ("rollback", "g-2")]


def test_without_a_lost_session_the_rollback_is_retried_at_once() -> None:
    """A missed rollback with no lost session named (or on a resource that cannot end one)
    is rolled back by its xid straight away."""
    a, plain = SessionEndingResource("a"), FakeResource("b")
    backlog = Backlog({"a": a, "b": plain}, MemoryDecisionLog(), None)
    backlog.missed_rollback("a", Xid.branch("g-3", "a"))
    backlog.missed_rollback("b", Xid.branch("g-4", "b"), lost_session=ServerSession(5, "c1"))
    assert backlog.retry_rollbacks() == 2
    assert a.calls == [("rollback", "g-3")]
