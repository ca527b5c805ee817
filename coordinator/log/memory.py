"""MemoryDecisionLog: the decision log in memory, for tests that crash it at will.

It keeps the records in order and how many of them are durable (forced).
:meth:`~MemoryDecisionLog.crash` models the machine going down (only forced
records survive), :meth:`~MemoryDecisionLog.reopen` the process going down
(everything written survives, as it would in the page cache), and
:meth:`~MemoryDecisionLog.tear_tail` a torn last record. It passes the same
failpoints as the file log: a torn record is never appended, an unsynced one
is appended but not forced.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from coordinator import failpoints
from coordinator.errors import CrashInjected, DecisionLogError
from coordinator.log import format as fmt


class MemoryDecisionLog:
    """A DecisionLog whose 'disk' is a list; ``records`` start out durable."""

    def __init__(self, records: Iterable[fmt.Record] = ()) -> None:
        self._records = list(records)
        self._durable = len(self._records)  # records[:_durable] are forced
        self._pending = fmt.replay(self._records)
        self._forced_writes = 0
        self._unusable: str | None = None
        self._lock = threading.Lock()

    def log_commit(self, gtrid: str, participants: Sequence[str], *, force: bool) -> None:
        """Append COMMIT(gtrid, participants); with ``force``, it is durable on return."""
        with self._lock:
            self._check_usable()
            try:
                if force:
                    failpoints.hit("log_torn_record")
                self._append(fmt.Commit(gtrid, tuple(participants)))
                if force:
                    failpoints.hit("log_unsynced_record")
                    self._force()
            except CrashInjected:
                self._unusable = "crashed at an injected failpoint; use crash() or reopen()"
                raise

    def log_end(self, gtrid: str) -> None:
        """Append END(gtrid), lazily."""
        with self._lock:
            self._check_usable()
            self._append(fmt.End(gtrid))

    def flush(self) -> None:
        """Make everything appended so far durable."""
        with self._lock:
            self._check_usable()
            self._force()

    def pending(self) -> dict[str, tuple[str, ...]]:
        """COMMIT records without END: gtrid -> participant names."""
        with self._lock:
            self._check_usable()
            return dict(self._pending)

    @property
    def forced_writes(self) -> int:
        """How many forces wrote something since this log was made."""
        return self._forced_writes

    def close(self) -> None:
        """Force what was appended (as the file log does) and refuse further use."""
        with self._lock:
            if self._unusable is None:
                self._force()
                self._unusable = "closed"

    # -- crashes -----------------------------------------------------------------

    @property
    def records(self) -> tuple[fmt.Record, ...]:
        """Every record appended, durable or not, oldest first."""
        return tuple(self._records)

    def crash(self) -> MemoryDecisionLog:
        """A fresh log holding what survives the machine crashing: the forced records."""
        with self._lock:
            self._unusable = self._unusable or "crashed; use the log crash() returned"
            return MemoryDecisionLog(self._records[: self._durable])

    def reopen(self) -> MemoryDecisionLog:
        """A fresh log holding what survives the process dying: every record written."""
        with self._lock:
            self._unusable = self._unusable or "crashed; use the log reopen() returned"
            return MemoryDecisionLog(self._records)

    def tear_tail(self) -> bool:
        """Drop the last record if it is not forced (a torn write); say whether one was."""
        with self._lock:
            if len(self._records) == self._durable:
                return False
            self._records.pop()
            self._pending = fmt.replay(self._records)
            return True

    # -- internals ---------------------------------------------------------------

    def _append(self, record: fmt.Record) -> None:
        fmt.encode(record)  # the same validation as the file log
        self._records.append(record)
        fmt.apply(self._pending, record)

    def _force(self) -> None:
        if self._durable < len(self._records):
            self._forced_writes += 1
            self._durable = len(self._records)

    def _check_usable(self) -> None:
        if self._unusable is not None:
            raise DecisionLogError(f"memory decision log is unusable: {self._unusable}")
