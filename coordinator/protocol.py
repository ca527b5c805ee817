"""The participant contract, in one file: everything the coordinator calls, in which order.

It holds, for threads and for asyncio: the XA resource and its branch, the last
resource and its session, the decision holder (a participant that keeps the
decisions as rows, a role the coordinator is given), the membership (liveness
of the coordinators sharing the participants), the recovery view (the
resource-level calls recovery and the backlog make, synchronous), and what a
transaction needs of its coordinator. It names no database driver's types: a
statement and its parameters are the participant's own (psycopg's, for
PostgreSQL), a cursor is anything that fetches.

The driver (the commit sequence), the coordinator and recovery call
participants through these protocols only; nothing is looked up by
``getattr``. Two kinds of participant take part in a global transaction.

**XA resources** (PostgreSQL). Each transaction gets one :class:`XABranch`
from :meth:`XAResource.begin`. Call order on a branch::

    begin -> execute* -> read_only -> [send_prepare] -> prepare
          -> [send_commit_prepared] -> commit_prepared | rollback
    begin -> execute* -> read_only -> commit_one_phase | rollback     # one-phase path
    ... -> release                                                    # always, last

* ``send_prepare`` / ``send_commit_prepared`` only send the command and never
  raise (a failure to send shows in the call that follows); the next
  ``prepare`` / ``commit_prepared`` waits for its answer. The driver sends to
  every branch before it waits on any, so the branches work at once on one
  thread. A branch may do nothing in them and all the work in the next call.

* ``execute`` may raise anything the database raises (the caller's SQL is
  theirs); the branch then records :attr:`XABranch.failure` and votes NO.
  Work that ends the branch's own transaction (COMMIT, ROLLBACK, PREPARE
  TRANSACTION inside it) breaks the branch: that call and every later one
  raise a ParticipantError without running anything, and the failure is
  :class:`~coordinator.errors.HeuristicMixed` when that work committed (the
  driver then reports ``Outcome.HEURISTIC_MIXED``, not ABORTED).
* ``prepare`` returns YES only when the database prepared this branch, and
  raises :class:`~coordinator.errors.PrepareFailed` for a NO vote; the branch
  is then rolled back (or will be, by the server, when its session ends).
* ``commit_one_phase`` raises ParticipantError when the commit got no clear
  answer: for the only writer that makes the outcome unknown.
* ``commit_prepared`` may raise ParticipantError (a lost connection): the driver
  retries and then hands the branch to recovery. It never turns into an abort.
* ``rollback`` must not raise, and does nothing for a branch already gone. If it
  could not reach a branch that may be prepared, :attr:`XABranch.left_prepared`
  stays True and recovery rolls it back by xid later.
* ``cancel`` may be called from another thread (the timeout watchdog) at any
  time before ``release``; it must not raise.
* ``release`` is always called last and must not raise.

**The recovery view.** Resource-level calls, used by recovery and by the
background retries, always synchronous (run in a worker thread under asyncio):
``recover`` lists the prepared branches with their age; ``commit_recovered`` /
``rollback_recovered`` resolve one by xid and return False when it is already
gone (they raise ParticipantError when the database cannot be reached). An
asyncio resource hands out its synchronous view (``recovery_resource``).

**One last resource** (ActiveMQ over STOMP). It cannot prepare; its commit is
the commit point. Call order on a session::

    begin -> (send | ack)* -> commit_with_marker | commit | abort ; release

* ``ack`` acknowledges, inside the transaction, a message delivered on the
  session's own connection (by its ack id): the message is consumed only if
  the transaction commits; after an ABORT, or if the connection dies first,
  the broker keeps it (docs/design.md §8). An ACK counts as work, like a SEND: a
  transaction that consumes a message and prepares a database branch reaches
  its commit point with the ACK and the marker in one broker COMMIT.
* ``commit_with_marker`` sends the commit marker for the gtrid inside the
  transaction, calls ``before_commit``, sends COMMIT, calls ``commit_sent``,
  and waits for the RECEIPT. The two callbacks are the driver's failpoints
  around the commit point. It raises :class:`~coordinator.errors.CommitRefused`
  when nothing was committed (an ERROR, or the connection lost before COMMIT
  went out), :class:`~coordinator.errors.OutcomeUnknown` when no answer came in
  time (only the marker, read after fencing, tells), and
  :class:`~coordinator.errors.HeuristicMixed` when the broker committed but
  refused a message of the transaction.
* ``abort`` and ``release`` never raise.

Resource-level calls on the broker, used by recovery: ``fence`` takes over
every session of this coordinator so that no COMMIT is in flight; ``settle``
does the same for one session whose COMMIT got no answer; ``markers`` reads
the marker queue with a full browse; ``remove_markers`` consumes the markers
of ended transactions.

**The decision holder** (docs/design.md §3). Without a broker writer, the
decision can be a row ``(gtrid)`` in a table of one XA participant: the driver
has the holder :meth:`~DecisionHolder.mark` the row inside that participant's
own branch, prepares every other branch, then commits that branch one-phase:
that commit is the commit point. Call order::

    mark (in the carrying branch) -> [commit_one_phase of that branch]
    settle (its commit got no answer) -> decided           # the backlog
    decided (after fencing)                                # recovery
    forget (rows of ended transactions) ; close

**Membership** (docs/design.md §4): each coordinator holds a liveness lock; one
that lost it reaches no new commit point (``holds`` is asked right before
each one); a peer whose lock is free is dead, and is claimed, fenced and
recovered.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from coordinator.states import Vote
from coordinator.xid import Xid


class Cursor(Protocol):
    """What a branch's ``execute`` returns: the statement's rows (psycopg's cursor is one)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class AsyncCursor(Protocol):
    """:class:`Cursor` for asyncio (psycopg's ``AsyncCursor`` is one)."""

    @property
    def rowcount(self) -> int: ...

    async def fetchone(self) -> Any: ...

    async def fetchall(self) -> list[Any]: ...


def no_callback() -> None:
    """The default commit-point callback: nothing to run at that step."""


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

    @property
    def failure(self) -> BaseException | None:
        """The error of the branch's work, if any: the branch will vote NO."""
        ...

    @property
    def left_prepared(self) -> bool:
        """True when a rollback could not reach a branch that may be prepared."""
        ...

    def execute(self, query: Any, params: Any = None) -> Cursor:
        """Run one statement (the participant's own kind: psycopg's query and parameters
        for PostgreSQL) in the branch and return its cursor."""
        ...

    def read_only(self) -> bool:
        """True when the branch wrote nothing (it then commits one-phase, early)."""
        ...

    def send_prepare(self) -> None:
        """Start phase 1 without waiting for the vote (see :meth:`prepare`). Never raises."""
        ...

    def prepare(self) -> Vote:
        """Phase 1: YES, or PrepareFailed for a NO vote (the branch is rolled back)."""
        ...

    def commit_one_phase(self) -> None:
        """Commit without prepare (single writer or read-only). Raises ParticipantError."""
        ...

    def send_commit_prepared(self) -> None:
        """Start phase 2 without waiting (see :meth:`commit_prepared`). Never raises."""
        ...

    def commit_prepared(self) -> None:
        """Phase 2 commit of the prepared branch. May raise ParticipantError; never aborts."""
        ...

    def rollback(self) -> None:
        """Roll back, whether active or prepared. Never raises."""
        ...

    def cancel(self) -> None:
        """Cancel the statement running now (from the watchdog's thread). Never raises."""
        ...

    def release(self) -> None:
        """Give the connection back. Always called last; never raises."""
        ...


class WorkEnding(Protocol):
    """A branch whose work can be ended before phase 1 (PostgreSQL's): see
    :meth:`coordinator.transaction.Transaction.end_work`."""

    def end_work(self, *, prepare: bool) -> None:
        """The branch takes no more work: its deferred work runs now, and with ``prepare``
        its PREPARE too. A failure of the work raises PrepareFailed (it will vote NO)."""
        ...


@runtime_checkable
class XAResource(Protocol):
    """A database that can prepare: hands out branches and resolves prepared ones."""

    @property
    def name(self) -> str: ...

    def begin(self, xid: Xid) -> XABranch:
        """Start branch ``xid`` on a pooled connection. Raises ParticipantUnavailable."""
        ...

    def recover(self, format_id: int, gtrid_prefix: str) -> dict[Xid, datetime | None]:
        """The prepared branches with ``format_id`` and the gtrid prefix -> when prepared.

        Raises ParticipantUnavailable when the database cannot be reached.
        """
        ...

    def commit_recovered(self, xid: Xid) -> bool:
        """COMMIT PREPARED ``xid``; False if no such prepared branch exists."""
        ...

    def rollback_recovered(self, xid: Xid) -> bool:
        """ROLLBACK PREPARED ``xid``; False if no such prepared branch exists."""
        ...

    def close(self) -> None:
        """Close the idle connections; those in use close when released. Never raises."""
        ...


@runtime_checkable
class LastResourceSession(Protocol):
    """The broker's transaction within one global transaction."""

    @property
    def name(self) -> str: ...

    @property
    def has_work(self) -> bool:
        """True once anything was sent or acknowledged inside the transaction."""
        ...

    def send(self, destination: str, body: str, headers: Mapping[str, str] | None = None) -> None:
        """SEND a persistent message inside the transaction. Raises ParticipantError."""
        ...

    def ack(self, ack_id: str) -> None:
        """ACK, inside the transaction, the message whose ack id is ``ack_id`` (delivered
        on this session's connection). Raises ParticipantError."""
        ...

    def send_ahead(self) -> None:
        """Phase 1 has begun: the session may send what it kept (BEGIN and its messages)
        now, while the databases prepare, so that its commit point carries less. Never
        raises: a connection lost here fails the commit point as not sent."""
        ...

    def commit_with_marker(
        self,
        gtrid: str,
        timeout: float,
        *,
        before_commit: Callable[[], None] = no_callback,
        commit_sent: Callable[[], None] = no_callback,
    ) -> None:
        """The commit point: marker, COMMIT, RECEIPT (see the module's docstring)."""
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

    def close(self) -> None:
        """Close every session. Never raises."""
        ...


# -- the asyncio counterparts ---------------------------------------------------------------
#
# The same contract, with ``async def`` for every call that does I/O: call order,
# which calls may raise and which must not are as documented above. Recovery and
# the background retries stay synchronous and run in a worker thread, so each
# asyncio resource also hands out a synchronous view of the same server for them.


@runtime_checkable
class AsyncXABranch(Protocol):
    """:class:`XABranch` for asyncio: one XA branch on one asyncio connection."""

    @property
    def name(self) -> str: ...

    @property
    def xid(self) -> Xid: ...

    @property
    def failure(self) -> BaseException | None: ...

    @property
    def left_prepared(self) -> bool: ...

    async def execute(self, query: Any, params: Any = None) -> AsyncCursor: ...

    async def read_only(self) -> bool: ...

    def send_prepare(self) -> None:
        """As :meth:`XABranch.send_prepare`; never raises. An asyncio branch may do nothing
        here: the driver awaits every branch's ``prepare`` at once."""
        ...

    async def prepare(self) -> Vote: ...

    async def commit_one_phase(self) -> None: ...

    def send_commit_prepared(self) -> None:
        """As :meth:`XABranch.send_commit_prepared`; never raises (may do nothing)."""
        ...

    async def commit_prepared(self) -> None: ...

    async def rollback(self) -> None: ...

    async def cancel(self) -> None: ...

    async def release(self) -> None: ...


class AsyncWorkEnding(Protocol):
    """:class:`WorkEnding` for asyncio."""

    async def end_work(self, *, prepare: bool) -> None: ...


@runtime_checkable
class AsyncXAResource(Protocol):
    """:class:`XAResource` for asyncio: hands out :class:`AsyncXABranch` es."""

    @property
    def name(self) -> str: ...

    async def begin(self, xid: Xid) -> AsyncXABranch:
        """Start branch ``xid``. Raises ParticipantUnavailable."""
        ...

    def recovery_resource(self) -> XAResource:
        """The same database as a synchronous XAResource, for recovery and the backlog
        (``recover``, ``commit_recovered``, ``rollback_recovered``), called in a worker
        thread."""
        ...

    async def close(self) -> None:
        """Close the idle connections. Never raises."""
        ...


@runtime_checkable
class AsyncLastResourceSession(Protocol):
    """:class:`LastResourceSession` for asyncio."""

    @property
    def name(self) -> str: ...

    @property
    def has_work(self) -> bool: ...

    async def send(
        self, destination: str, body: str, headers: Mapping[str, str] | None = None
    ) -> None: ...

    async def ack(self, ack_id: str) -> None: ...

    async def send_ahead(self) -> None: ...

    async def commit_with_marker(
        self,
        gtrid: str,
        timeout: float,
        *,
        before_commit: Callable[[], None] = no_callback,
        commit_sent: Callable[[], None] = no_callback,
    ) -> None: ...

    async def commit(self, timeout: float) -> None: ...

    async def abort(self) -> None: ...

    async def release(self) -> None: ...


@runtime_checkable
class AsyncLastResource(Protocol):
    """:class:`LastResource` for asyncio: sessions are asyncio, recovery is synchronous."""

    @property
    def name(self) -> str: ...

    async def begin(self, gtrid: str) -> AsyncLastResourceSession:
        """BEGIN a broker transaction for ``gtrid``. Raises ParticipantUnavailable."""
        ...

    async def settle(self, session: AsyncLastResourceSession, timeout: float) -> None:
        """As :meth:`LastResource.settle`, for a session of this resource."""
        ...

    def recovery_broker(self) -> LastResource:
        """The same broker as a synchronous LastResource for recovery and the backlog,
        called in a worker thread. Its ``fence`` first closes this resource's idle
        sessions, so that every client-id can be taken over; it begins no transaction."""
        ...

    async def close(self) -> None:
        """Close every session. Never raises."""
        ...


# -- the decision holder ------------------------------------------------------------------


@runtime_checkable
class DecisionHolder(Protocol):
    """Decisions held by a participant, as rows of its table: the commit-markable resource
    (docs/design.md §3). A row ``(gtrid)`` means COMMIT.

    The rows of a coordinator are final only once its sessions are fenced (its
    one-phase commit may still be in flight): :meth:`decided` is read by recovery
    after fencing, and by the backlog after :meth:`settle`.
    """

    @property
    def participant(self) -> str:
        """The name of the XA participant that holds the table."""
        ...

    def mark(self, branch: XABranch, gtrid: str) -> None:
        """Write ``gtrid``'s row inside ``branch`` (the holder's own participant): it
        commits with the branch, or never. Remembers the session, for :meth:`settle`.
        Raises whatever the database raised (nothing is decided then)."""
        ...

    async def amark(self, branch: AsyncXABranch, gtrid: str) -> None:
        """:meth:`mark` inside an asyncio branch."""
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
        """Close the holder's own session. Never raises."""
        ...


# -- membership ---------------------------------------------------------------------------


class Membership(Protocol):
    """Liveness of the coordinators sharing the participants; every call names its own."""

    @property
    def coordinator_id(self) -> str: ...

    def join(self, *, fence_timeout: float = 30.0) -> None:
        """Take this coordinator's lock (and end an earlier incarnation's sessions).
        Raises ConfigurationError when a live coordinator holds it."""
        ...

    def holds(self) -> bool:
        """True while this coordinator holds its lock. Cheap: asked before each commit point."""
        ...

    def keep(self) -> bool:
        """Take the lock again if it was lost; True when held. Never raises."""
        ...

    def leave(self) -> None:
        """Release the lock. Never raises."""
        ...

    def peers(self) -> list[str]:
        """The other coordinator ids that take part (raises ParticipantError)."""
        ...

    def claim(self, peer: str) -> bool:
        """Take ``peer``'s lock; False when it is held (the peer is alive)."""
        ...

    def release(self, peer: str) -> None:
        """Give ``peer``'s lock back. Never raises."""
        ...

    def fence(self, peer: str, timeout: float) -> None:
        """End every database session of ``peer`` and wait until they are gone.
        Raises ParticipantError when that cannot be seen within ``timeout``."""
        ...
