"""The participant contract, written once: what the driver and recovery call, in which order.

Two kinds of participant take part in a global transaction:

* **XA resources** (PostgreSQL): each transaction gets one :class:`XABranch`
  from :meth:`XAResource.begin`. Call order on a branch::

      begin -> (work) -> [read_only] -> prepare -> commit_prepared | rollback
      begin -> (work) -> [read_only] -> commit_one_phase | rollback   # one-phase path

  ``prepare`` returns YES or READ_ONLY and raises :class:`PrepareFailed` for a
  NO vote (the branch is then already rolled back). ``commit_prepared`` may
  fail (connection lost): the driver retries and leaves the rest to recovery;
  it never turns into an abort. ``rollback`` must not raise for a branch that
  is already gone. ``release`` is always called last and must not raise.

* **One last resource** (ActiveMQ over STOMP): it cannot prepare. Its commit
  is the commit point. Call order on a session::

      begin -> send* -> commit_with_marker | commit | abort ; release

  ``commit_with_marker`` sends the commit marker for the gtrid inside the
  transaction, then COMMIT, and waits for the RECEIPT. It raises
  :class:`CommitRefused` when the broker answered with an ERROR (nothing was
  committed) and :class:`OutcomeUnknown` when no answer came in time (the
  transaction is in doubt: only the marker, read after fencing, tells).

Recovery uses the resource-level calls: ``XAResource.recover`` lists the
prepared branches, ``commit_recovered`` / ``rollback_recovered`` resolve one
(returning False when the branch is already gone), ``LastResource.fence``
takes over the dead coordinator's broker sessions so that the marker queue is
final, and ``LastResource.markers`` reads it with a full browse.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol, runtime_checkable

from coordinator.states import Vote
from coordinator.xid import Xid


@runtime_checkable
class XABranch(Protocol):
    """One XA branch of one global transaction, bound to one connection."""

    @property
    def name(self) -> str:
        """The participant's name ('a', 'b', ...): the branch qualifier."""
        ...

    @property
    def xid(self) -> Xid:
        """The branch's Xid."""
        ...

    def read_only(self) -> bool:
        """True when the branch wrote nothing (it may then commit one-phase, early)."""
        ...

    def prepare(self) -> Vote:
        """Phase 1: YES (prepared) or READ_ONLY (committed already, leaves the protocol).

        Raises PrepareFailed for a NO vote or any failure; the branch is then
        rolled back (or will be, by the server, when its session ends).
        """
        ...

    def commit_one_phase(self) -> None:
        """Commit without prepare (single writer or read-only). Raises ParticipantError."""
        ...

    def commit_prepared(self) -> None:
        """Phase 2 commit of the prepared branch. May raise; the caller retries."""
        ...

    def rollback(self) -> None:
        """Roll back, whether active or prepared. Never raises for a branch already gone."""
        ...

    def release(self) -> None:
        """Give the connection back. Always called last; never raises."""
        ...


@runtime_checkable
class XAResource(Protocol):
    """A database that can prepare: hands out branches and resolves prepared ones."""

    @property
    def name(self) -> str: ...

    def begin(self, xid: Xid) -> XABranch:
        """Start branch ``xid`` on a pooled connection. Raises ParticipantUnavailable."""
        ...

    def recover(self, format_id: int, gtrid_prefix: str) -> list[Xid]:
        """The prepared branches with ``format_id`` whose gtrid starts with the prefix."""
        ...

    def commit_recovered(self, xid: Xid) -> bool:
        """COMMIT PREPARED ``xid``; False if no such prepared branch exists."""
        ...

    def rollback_recovered(self, xid: Xid) -> bool:
        """ROLLBACK PREPARED ``xid``; False if no such prepared branch exists."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LastResourceSession(Protocol):
    """The broker's transaction within one global transaction."""

    @property
    def name(self) -> str: ...

    @property
    def has_work(self) -> bool:
        """True once anything was sent inside the transaction."""
        ...

    def send(self, destination: str, body: str, headers: Mapping[str, str] | None = None) -> None:
        """SEND a persistent message inside the transaction."""
        ...

    def commit_with_marker(self, gtrid: str, timeout: float) -> None:
        """The commit point: marker, COMMIT, RECEIPT. Raises CommitRefused / OutcomeUnknown."""
        ...

    def commit(self, timeout: float) -> None:
        """One-phase COMMIT (the broker is the only writer). Same errors as above."""
        ...

    def abort(self) -> None:
        """ABORT the transaction. Never raises."""
        ...

    def release(self) -> None:
        """Give the session back (or drop it if its state is unknown). Never raises."""
        ...


@runtime_checkable
class LastResource(Protocol):
    """A broker that commits last: its commit is the commit point."""

    @property
    def name(self) -> str: ...

    def begin(self, gtrid: str) -> LastResourceSession:
        """BEGIN a broker transaction for ``gtrid``. Raises ParticipantUnavailable."""
        ...

    def fence(self, timeout: float) -> None:
        """Take over every session client-id of this coordinator, so no COMMIT is in flight.

        Raises ParticipantError if a live process still holds one after ``timeout``.
        """
        ...

    def settle(self, session: LastResourceSession, timeout: float) -> None:
        """Fence one session whose COMMIT got no answer: on return, the broker has
        processed or discarded everything it sent, so the marker queue is final for
        its gtrid. Raises ParticipantError if that cannot be known within ``timeout``.
        """
        ...

    def markers(self) -> set[str]:
        """The gtrids whose commit marker is on the marker queue (a full browse)."""
        ...

    def remove_markers(self, gtrids: Collection[str]) -> int:
        """Consume the markers of ``gtrids`` (ended transactions); return how many."""
        ...

    def close(self) -> None: ...
