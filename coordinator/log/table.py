"""TableDecisionLog: a decision log that keeps no local state (docs/design.md §3).

With a broker writer the commit marker is the decision: its COMMIT record
(``force=False``) is not written anywhere. Without one, the driver's
commit-markable path writes the decision row inside the participant's own
branch. There is no forced record: a decision written on a session of its
own could be written by a zombie after it was fenced, so it is refused.
END records are collected and delete their rows in batches, like the
broker's marker sweep. Nothing is pending locally: recovery reads the rows
of the participant, after fencing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from coordinator import events
from coordinator.errors import DecisionLogError, TwoPhaseCommitError
from coordinator.protocol import DecisionHolder


class TableDecisionLog:
    """A DecisionLog over the rows of a :class:`~coordinator.protocol.DecisionHolder` (the
    one the coordinator is given to hold its decisions); ``end_batch`` ENDs
    delete their rows in one statement."""

    def __init__(self, table: DecisionHolder, *, end_batch: int = 500) -> None:
        self._table = table
        self.end_batch = end_batch
        self._ended: list[str] = []
        self._lock = threading.Lock()

    def log_commit(self, gtrid: str, participants: Sequence[str], *, force: bool) -> None:
        """A lazy COMMIT (the marker decided) is nothing; a forced one is refused."""
        if force:
            raise DecisionLogError(
                f"gtrid {gtrid}: a decision without a broker is the decision row committed "
                f"in participant {self._table.participant!r}'s own branch; this log keeps "
                "no records of its own"
            )

    def log_end(self, gtrid: str) -> None:
        """``gtrid`` ended: its row (if any) goes with the next batch."""
        with self._lock:
            self._ended.append(gtrid)
            due = len(self._ended) >= self.end_batch
        if due:
            self._sweep()

    def flush(self) -> None:
        """Delete the rows of every transaction that ended so far."""
        self._sweep()

    def pending(self) -> dict[str, tuple[str, ...]]:
        """Nothing is kept here: the decisions are the table's rows and the markers."""
        return {}

    @property
    def forced_writes(self) -> int:
        """Always 0: the decision rows are committed with their participant's branch."""
        return 0

    def close(self) -> None:
        """Delete what ended, then close the table's session. Never raises."""
        self._sweep()
        self._table.close()

    def _sweep(self) -> None:
        with self._lock:
            batch, self._ended = self._ended, []
        if not batch:
            return
        try:
            removed = self._table.forget(batch)
        except TwoPhaseCommitError as exc:  # kept for the next sweep
            events.get_logger().warning(events.DECISION_ROWS_REMOVE_FAILED, error=str(exc))
            with self._lock:
                self._ended.extend(batch)
            return
        events.get_logger().debug(events.DECISION_ROWS_REMOVED, count=removed)
