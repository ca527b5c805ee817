# Generated from participants/aio/group_commit.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""Group commit: callers that arrive while one commit runs share the next one.

The classic leader/follower scheme (as the decision log shares its fsyncs):
a caller that finds no commit running runs its own at once, alone, so a
single caller waits for nothing; callers that arrive while it runs queue up,
and when it ends the first of them runs one commit for the whole queue. Under
load, one round trip (one broker COMMIT and RECEIPT) serves many transactions;
with no load, nothing changes.

The batch function gets every queued item and returns one result per item:
``None`` for success or the exception that item's caller must see, so that
each member of a group can fail with an error naming its own gtrid.

Written once, for asyncio tasks; ``scripts/unasync.py`` generates the thread
version, :mod:`participants.group_commit`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from coordinator.compat import Condition

I = TypeVar("I")  # noqa: E741 - the conventional name of an item type variable

Outcomes = list[BaseException | None]


@dataclass
class _Entry(Generic[I]):
    item: I
    done: bool = False
    error: BaseException | None = field(default=None)


class GroupCommit(Generic[I]):
    """Runs ``commit_batch`` for groups of items submitted by many callers."""

    def __init__(self, commit_batch: Callable[[Sequence[I]], Outcomes]) -> None:
        self._commit_batch = commit_batch
        self._cond = Condition()
        self._queue: list[_Entry[I]] = []
        self._running = False
        self.batches = 0  # commits run (for tests and the benchmark)
        self.items = 0  # items committed in them

    def submit(self, item: I) -> None:
        """Commit ``item`` in the next group; raise its own error if that failed."""
        entry = _Entry(item)
        with self._cond:
            self._queue.append(entry)
            while self._running and not entry.done:
                self._cond.wait()
            if entry.done:
                self._raise_for(entry)
                return
            self._running = True
            batch, self._queue = self._queue, []
        outcomes: Outcomes = []
        try:
            outcomes = self._commit_batch([e.item for e in batch])
        except BaseException as exc:  # a bug in the batch: every member sees it
            outcomes = [exc] * len(batch)
        finally:
            with self._cond:  # members are done before anyone may lead the next group
                if len(outcomes) != len(batch):
                    outcomes = [RuntimeError("the group commit was interrupted")] * len(batch)
                for member, outcome in zip(batch, outcomes, strict=True):
                    member.error = outcome
                    member.done = True
                self.batches += 1
                self.items += len(batch)
                self._running = False
                self._cond.notify_all()
        self._raise_for(entry)

    @staticmethod
    def _raise_for(entry: _Entry[I]) -> None:
        if entry.error is not None:
            raise entry.error
