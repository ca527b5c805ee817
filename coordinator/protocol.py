"""The participant contract, written once: everything the coordinator calls, in which order.

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

Resource-level calls, used by recovery and by the background retries:
``recover`` lists the prepared branches with their age; ``commit_recovered`` /
``rollback_recovered`` resolve one by xid and return False when it is already
gone (they raise ParticipantError when the database cannot be reached).

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
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import psycopg
from psycopg.abc import Params, Query

from coordinator.states import Vote
from coordinator.xid import Xid


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

    def execute(self, query: Query, params: Params | None = None) -> psycopg.Cursor[Any]:
        """Run one statement in the branch and return its cursor."""
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
    """:class:`XABranch` for asyncio: one XA branch on one ``psycopg.AsyncConnection``."""

    @property
    def name(self) -> str: ...

    @property
    def xid(self) -> Xid: ...

    @property
    def failure(self) -> BaseException | None: ...

    @property
    def left_prepared(self) -> bool: ...

    async def execute(
        self, query: Query, params: Params | None = None
    ) -> psycopg.AsyncCursor[Any]: ...

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
