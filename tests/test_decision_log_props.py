"""Properties of the decision log: format round trips and damage, file and memory logs agree."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from coordinator import failpoints
from coordinator.errors import CrashInjected, DecisionLogCorrupt
from coordinator.log import format as fmt
from coordinator.log.file import FileDecisionLog
from coordinator.log.memory import MemoryDecisionLog

gtrids = st.sampled_from([f"tx-{i}" for i in range(6)])
names = st.lists(st.sampled_from(["pg-a", "pg-b", "mq", "pg-ü"]), max_size=3).map(tuple)
commits = st.builds(fmt.Commit, gtrids, names)
records = st.one_of(
    commits,
    st.builds(fmt.End, gtrids),
    st.builds(fmt.Checkpoint, st.lists(commits, max_size=3).map(tuple)),
)


def image(recs: list[fmt.Record]) -> tuple[bytes, list[int]]:
    """A log image of ``recs`` and the offset of each record (plus the end)."""
    data, offsets = bytearray(fmt.HEADER), []
    for record in recs:
        offsets.append(len(data))
        data += fmt.encode(record)
    return bytes(data), [*offsets, len(data)]


@given(st.lists(records, max_size=8))
def test_scan_returns_what_was_encoded(recs: list[fmt.Record]) -> None:
    """Encoding records and scanning the image gives the same records back."""
    data, _ = image(recs)
    assert fmt.scan(data, "log") == fmt.Scan(recs, len(data))


@given(st.lists(records, min_size=1, max_size=8), st.data())
def test_any_truncation_is_a_torn_tail(recs: list[fmt.Record], data: st.DataObject) -> None:
    """Cutting an image anywhere after the header leaves the records wholly before the cut."""
    full, offsets = image(recs)
    cut = data.draw(st.integers(fmt.HEADER_SIZE, len(full)))
    whole = [r for r, end in zip(recs, offsets[1:], strict=True) if end <= cut]
    assert fmt.scan(full[:cut], "log") == fmt.Scan(whole, offsets[len(whole)])


@given(st.lists(records, min_size=1, max_size=6), st.data())
def test_one_damaged_byte_is_torn_at_the_end_and_corrupt_in_the_middle(
    recs: list[fmt.Record], data: st.DataObject
) -> None:
    """A changed byte in the last record truncates it; in any other, raises at its offset."""
    full, offsets = image(recs)
    where = data.draw(st.integers(fmt.HEADER_SIZE, len(full) - 1))
    damaged = bytearray(full)
    damaged[where] ^= data.draw(st.integers(1, 255))
    index = max(i for i, offset in enumerate(offsets) if offset <= where)
    if index == len(recs) - 1:
        assert fmt.scan(bytes(damaged), "log") == fmt.Scan(recs[:index], offsets[index])
    else:
        with pytest.raises(DecisionLogCorrupt) as caught:
            fmt.scan(bytes(damaged), "log")
        assert caught.value.offset == offsets[index]


class FileAgreesWithMemory(RuleBasedStateMachine):
    """The same operations, crashes included, leave the file and memory logs agreeing."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.path = Path(self.dir) / "decisions.log"
        self.file = self.open_file()
        self.memory = MemoryDecisionLog()

    def open_file(self) -> FileDecisionLog:
        # A tiny threshold makes compaction part of nearly every run.
        return FileDecisionLog(self.path, compact_threshold_bytes=160)

    @rule(gtrid=gtrids, participants=names, force=st.booleans())
    def commit(self, gtrid: str, participants: tuple[str, ...], force: bool) -> None:
        self.file.log_commit(gtrid, participants, force=force)
        self.memory.log_commit(gtrid, participants, force=force)

    @rule(gtrid=gtrids)
    def end(self, gtrid: str) -> None:
        self.file.log_end(gtrid)
        self.memory.log_end(gtrid)

    @rule()
    def reopen(self) -> None:
        self.file.close()
        self.memory.close()
        self.file = self.open_file()
        self.memory = MemoryDecisionLog(self.memory.records)

    @rule(
        failpoint=st.sampled_from(["log_torn_record", "log_unsynced_record"]),
        gtrid=gtrids,
        participants=names,
    )
    def crash_in_forced_commit(
        self, failpoint: str, gtrid: str, participants: tuple[str, ...]
    ) -> None:
        for log in (self.file, self.memory):
            failpoints.arm(failpoint, "raise")
            with pytest.raises(CrashInjected):
                log.log_commit(gtrid, participants, force=True)
        self.file = self.open_file()  # the process died: what it wrote is still there
        self.memory = self.memory.reopen()

    @invariant()
    def pending_agrees(self) -> None:
        assert self.file.pending() == self.memory.pending()

    def teardown(self) -> None:
        failpoints.disarm()
        self.file.close()
        shutil.rmtree(self.dir)


FileAgreesWithMemory.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None
)
test_file_log_agrees_with_memory_log = FileAgreesWithMemory.TestCase
