"""The decision log: what the coordinator decided, durable before anyone is told.

Implementations: :class:`~coordinator.log.file.FileDecisionLog` (a file, with
group commit), :class:`~coordinator.log.memory.MemoryDecisionLog` (tests) and
:class:`~coordinator.log.table.TableDecisionLog` (no local state: the decisions
are the broker's markers and the rows of a :class:`DecisionTable`, docs/design.md §3).
Tools that only look at a log (``twopc indoubt``, the torture's checks) read it
with :func:`~coordinator.log.file.read_pending`, which takes no lock.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import LiteralString, Protocol


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


class DecisionTable(Protocol):
    """Decisions held by a participant: the commit-markable resource (docs/design.md §3).

    A row ``(gtrid)`` in the table means COMMIT. Without a broker writer, the
    driver writes it with :attr:`mark_query` inside that participant's own branch,
    prepares every other branch first and then commits that branch one-phase:
    that commit is the commit point. The rows of a coordinator are final only
    once its sessions are fenced (its one-phase commit may still be in flight):
    :meth:`decided` is read by recovery after fencing, and by the background
    after :meth:`settle`.
    """

    @property
    def participant(self) -> str:
        """The name of the XA participant that holds the table."""
        ...

    @property
    def mark_query(self) -> LiteralString:
        """The statement the driver runs inside the carrying branch with ``(gtrid,)``:
        it INSERTs the row (committed with the branch, or never) and returns the
        session's backend pid, which :meth:`marked` keeps for :meth:`settle`."""
        ...

    def marked(self, gtrid: str, backend_pid: int) -> None:
        """``gtrid``'s row was written on the session ``backend_pid`` (not committed yet)."""
        ...

    def decided(self, gtrid_prefix: str) -> set[str]:
        """The gtrids starting with ``gtrid_prefix`` that have a row. Raises ParticipantError."""
        ...

    def settle(self, gtrid: str, timeout: float) -> None:
        """End the session that carried ``gtrid``'s one-phase commit, if it is still there,
        and wait until it is gone: then :meth:`decided` is final for ``gtrid``.
        Raises ParticipantError when that cannot be known within ``timeout``."""
        ...

    def forget(self, gtrids: Collection[str]) -> int:
        """Delete the rows of ended transactions; return how many. Raises ParticipantError."""
        ...

    def close(self) -> None:
        """Close the table's own session. Never raises."""
        ...


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

    @property
    def table(self) -> DecisionTable | None:
        """Where a participant holds the decisions (commit-markable resource), or None."""
        ...

    def close(self) -> None: ...
