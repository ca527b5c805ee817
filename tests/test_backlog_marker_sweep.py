"""The backlog asks for one marker sweep per batch of ended transactions, on the fakes:
not one per transaction that ends before the sweep takes the batch, again after a sweep
that failed, and at the coordinator's next end when the backlog's own resolution made
the batch due."""

from __future__ import annotations

from pathlib import Path

from coordinator.backlog import Backlog, Unfinished
from coordinator.log.file import FileDecisionLog
from coordinator.log.memory import MemoryDecisionLog
from participants.fake import FakeBroker, FakeResource


def test_one_sweep_is_asked_for_per_batch(tmp_path: Path) -> None:
    """With a batch of 10, the 10th end asks for a sweep and the ends after it, before the
    sweep runs, do not; the sweep flushes the log once, and the next batch asks again."""
    log = FileDecisionLog(tmp_path / "decisions.log")
    backlog = Backlog({}, log, FakeBroker(), marker_batch=10)
    try:
        asked = []
        for n in range(25):
            log.log_commit(f"g-{n}", ["a", "mq"], force=False)
            log.log_end(f"g-{n}")
            asked.append(backlog.ended(f"g-{n}"))
        assert [n for n, due in enumerate(asked) if due] == [9]
        backlog.sweep_markers()
        assert log.forced_writes == 1
        assert [backlog.ended(f"h-{n}") for n in range(10)] == [False] * 9 + [True]
        assert backlog.ended("h-10") is False
    finally:
        log.close()


def test_a_failed_sweep_is_asked_for_again() -> None:
    """A sweep whose marker removal failed keeps its batch, and the next end asks again."""
    broker = FakeBroker()
    broker.fail("remove_markers", "error")
    backlog = Backlog({}, MemoryDecisionLog(), broker, marker_batch=3)
    assert [backlog.ended(g) for g in ("g-1", "g-2", "g-3")] == [False, False, True]
    assert backlog.sweep_markers() == 0
    assert backlog.holds("g-1")
    assert backlog.ended("g-4") is True
    backlog.sweep_markers()
    assert not backlog.holds("g-1") and not backlog.holds("g-4")


def test_a_batch_made_due_by_the_backlog_is_asked_for_at_the_next_end() -> None:
    """A deferred phase 2 the backlog finishes fills the batch; it asks for no sweep of
    its own (nobody would run it), so the coordinator's next end asks for it."""
    backlog = Backlog({"a": FakeResource("a")}, MemoryDecisionLog(), FakeBroker(), marker_batch=2)
    assert backlog.ended("g-1") is False
    backlog.defer(Unfinished("g-2", ("a",), marker_sent=True, decision_carrier=None))
    assert backlog.retry_deferred() == 1
    assert backlog.holds("g-2")
    assert backlog.ended("g-3") is True
