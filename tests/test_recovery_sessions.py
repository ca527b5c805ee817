"""Recovery ends the coordinator's busy database sessions before it lists the prepared
branches (docs/design.md §5, "Work a dead process left running"), on the fakes: when,
with what, and not in a dry run."""

from __future__ import annotations

import time
from datetime import datetime

import structlog

from coordinator import events
from coordinator.log.memory import MemoryDecisionLog
from coordinator.recovery import Recovery
from coordinator.xid import Xid
from participants.fake import FakeResource
from scenarios.log_setup import configure as configure_logging


class EndingResource(FakeResource):
    """A fake database that ends busy sessions: records each call, and each listing after."""

    def __init__(self, name: str, ended: int) -> None:
        super().__init__(name)
        self.ended = ended
        self.calls: list[tuple[str, object]] = []
        self.deadlines: list[float] = []  # seconds left at each call

    def end_sessions_named(
        self, application_name: str, deadline: float, *, busy_only: bool = False
    ) -> int:
        self.calls.append(("end", (application_name, busy_only)))
        self.deadlines.append(deadline - time.monotonic())
        return self.ended

    def recover(self, format_id: int, gtrid_prefix: str) -> dict[Xid, datetime | None]:
        self.calls.append(("list", gtrid_prefix))
        return super().recover(format_id, gtrid_prefix)


def test_recovery_ends_the_busy_sessions_of_its_coordinator_before_it_lists() -> None:
    """Each resource that can is asked to end the sessions named by the coordinator's id,
    busy ones only, by the fence timeout, before its prepared branches are listed; a resource that
    cannot (a plain fake) is listed as before; the event names the ones that ended some."""
    a, b, plain = EndingResource("a", 2), EndingResource("b", 0), FakeResource("c")
    configure_logging("INFO")  # the suite's default level filters recovery's events out
    try:
        with structlog.testing.capture_logs() as logs:
            Recovery("coord-1", MemoryDecisionLog(), [a, b, plain], None).run(fence_timeout=7.0)
    finally:
        configure_logging()
    assert a.calls == [("end", ("coord-1", True)), ("list", "coord-1.")]
    assert b.calls == [("end", ("coord-1", True)), ("list", "coord-1.")]
    assert all(6.0 < left <= 7.0 for left in a.deadlines + b.deadlines)
    ended = [e for e in logs if e["event"] == events.RECOVERY_SESSIONS_ENDED]
    assert [(e["participant"], e["sessions"]) for e in ended] == [("a", 2)]


def test_a_dry_run_ends_no_session() -> None:
    """The dry run of 'twopc indoubt' changes nothing: it lists, and ends no session."""
    a = EndingResource("a", 1)
    Recovery("coord-1", None, [a], None, pending={}).run(dry_run=True)
    assert a.calls == [("list", "coord-1.")]
