"""The decision log: what the coordinator decided, durable before anyone is told.

Implementations: :class:`~coordinator.log.file.FileDecisionLog` (a file, with
group commit), :class:`~coordinator.log.memory.MemoryDecisionLog` (tests) and
:class:`~coordinator.log.table.TableDecisionLog` (no local state: the decisions
are the broker's markers and the rows of the coordinator's decision holder,
:class:`~coordinator.protocol.DecisionHolder`, docs/design.md §3). The log is
only a log: which participant holds the decisions is the coordinator's to know.
Tools that only look at a log (``twopc indoubt``, the torture's checks) read it
with :func:`~coordinator.log.file.read_pending`, which takes no lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol


def commit_record_participants(
    prepared: Iterable[str], last_resource: str | None
) -> tuple[str, ...]:
    """The one rule for what a COMMIT record lists.

    The XA participants that were prepared when the decision was taken, sorted,
    then the last resource whose commit carried the decision (its marker), if
    any. Every writer of a COMMIT record (the driver, recovery, the background
    resolution) builds the list here.
    """
    names = sorted(set(prepared))
    return (*names, last_resource) if last_resource is not None else tuple(names)


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
