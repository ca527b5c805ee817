"""The decision log: what the coordinator decided, durable before anyone is told."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class DecisionLog(Protocol):
    """Append-only record of COMMIT decisions and of transactions that ended.

    ``log_commit(force=True)`` returns only once the record is on disk (it
    shares the fsync with concurrent callers: group commit). ``log_commit``
    with ``force=False`` and ``log_end`` are lazy: they are made durable by
    the next forced write or :meth:`flush`.
    """

    def log_commit(self, gtrid: str, participants: Sequence[str], *, force: bool) -> None: ...

    def log_end(self, gtrid: str) -> None: ...

    def flush(self) -> None:
        """Make everything appended so far durable."""
        ...

    def pending(self) -> dict[str, tuple[str, ...]]:
        """COMMIT records without END: gtrid -> participant names."""
        ...

    @property
    def forced_writes(self) -> int:
        """How many fsyncs the log has done since it was opened."""
        ...

    def close(self) -> None: ...
