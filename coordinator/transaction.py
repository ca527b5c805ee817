# Generated from coordinator/aio/transaction.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""One global transaction as its user sees it: branches, broker sends, commit on exit.

The transaction's state and every change of it live in
:class:`~coordinator.transaction_state.TransactionState`; this module adds the
work. It knows its coordinator only through
:class:`TransactionHost`, so it imports no coordinator.

The work API is written once, for asyncio, in :mod:`coordinator.aio.transaction`;
``scripts/unasync.py`` generates the synchronous :mod:`coordinator.transaction`
from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, cast

from coordinator import events, tracing
from coordinator.errors import (
    HeuristicMixed,
    InvalidTransition,
    PrepareFailed,
    TransactionAborted,
    TransactionInDoubt,
    TwoPhaseCommitError,
    UnknownParticipant,
)
from coordinator.protocol import (
    Cursor,
    LastResource,
    LastResourceSession,
    WorkEnding,
    XABranch,
    XAResource,
)
from coordinator.states import Outcome, TxState, require
from coordinator.transaction_state import TransactionState
from coordinator.xid import Xid


class TransactionHost(Protocol):
    """What a transaction needs from its coordinator."""

    @property
    def resources(self) -> Mapping[str, XAResource]: ...

    @property
    def broker(self) -> LastResource | None: ...

    def finish(self, tx: Transaction, *, commit: bool) -> Outcome:
        """Run the commit (or rollback) sequence; return the outcome."""
        ...

    def failpoint(self, name: str) -> None: ...

    def prepares_early(self, participant: str) -> bool:
        """Whether a branch on ``participant`` whose work is ended should prepare now
        (:meth:`Transaction.end_work`)."""
        ...


class Transaction(TransactionState[XABranch, LastResourceSession]):
    """A global transaction: hands out branches lazily, commits atomically.

    Use it as a context manager: leaving the block normally commits and raises
    TransactionAborted, TransactionInDoubt or (a branch's work committed on its own)
    HeuristicMixed unless the outcome is COMMITTED; leaving it with an exception rolls
    everything back and lets it propagate.
    """

    __slots__ = ("_host",)

    def __init__(self, host: TransactionHost, gtrid: str, timeout: float) -> None:
        super().__init__(gtrid, timeout)
        self._host = host

    # -- work -----------------------------------------------------------------

    def branch(self, name: str) -> XABranch:
        """The branch on database ``name`` ('a', 'b', ...), begun on first use."""
        self._check_active()
        found = self._branches.get(name)
        if found is not None:
            return found
        resource = self._host.resources.get(name)
        if resource is None:
            known = ", ".join(sorted(self._host.resources)) or "none"
            raise UnknownParticipant(
                f"transaction {self.gtrid}: no participant named {name!r} (known: {known})"
            )
        branch = resource.begin(Xid.branch(self.gtrid, name))
        self._add_branch(name, branch)
        if self.debug:
            self.log.debug(events.BEGIN, participant=name)
        self._host.failpoint("after_begin")
        return branch

    def execute(self, name: str, query: Any, params: Any = None) -> Cursor:
        """Run one statement on branch ``name`` (psycopg's query and parameters for
        PostgreSQL); returns its cursor."""
        branch = self.branch(name)
        return branch.execute(query, params)

    def end_work(self, name: str) -> None:
        """Branch ``name`` takes no more work: its deferred statements go now, and a
        failure of its work raises PrepareFailed here, naming the participant and the
        gtrid (the transaction then rolls back); TransactionTimeout instead when the
        watchdog cancelled that work, the NO vote as its cause.

        The coordinator chooses when its PREPARE goes (docs/design.md §2, "Ending the
        work: now or at phase 1"). With other transactions in flight, in the same round
        trip as the work (``prepare_now``): a round trip and its CPU less per
        transaction, which is what counts when the transactions share the CPU. Alone,
        at phase 1, beside the other branches' work: its wait for the WAL overlaps
        theirs, which is what counts for one transaction's latency. Work done one
        branch after the other calls this on each branch but the last. The DEBUG event
        ``tpc.work.ended`` says which (``prepare_now``). A PostgreSQL branch only
        (others raise InvalidTransition).
        """
        branch = self.branch(name)
        if getattr(branch, "end_work", None) is None:  # isinstance on a Protocol: 3.7 us
            raise InvalidTransition(
                f"transaction {self.gtrid}: participant {name!r} cannot end its work "
                "before phase 1 (end_work() takes a PostgreSQL branch)"
            )
        early = self._host.prepares_early(name)
        if self.debug:
            self.log.debug(events.WORK_ENDED, participant=name, prepare_now=early)
        try:
            cast(WorkEnding, branch).end_work(prepare=early)
        except PrepareFailed as exc:
            if self.timed_out:  # the NO vote of the statement the watchdog cancelled
                raise self.timeout_error() from exc
            raise

    def send(self, destination: str, body: str, headers: Mapping[str, str] | None = None) -> None:
        """Send a persistent message inside the broker's transaction.

        The broker adds the ``gtrid`` header and, with tracing, ``traceparent``.
        """
        session = self._broker_session()
        with tracing.active(self.span):
            session.send(destination, body, headers)
        self.messages_sent += 1

    def ack(self, ack_id: str) -> None:
        """Acknowledge a received message inside the broker's transaction (consumed on commit)."""
        session = self._broker_session()
        session.ack(ack_id)

    def _broker_session(self) -> LastResourceSession:
        self._check_active()
        if self.broker is None:
            broker = self._host.broker
            if broker is None:
                raise UnknownParticipant(
                    f"transaction {self.gtrid}: this coordinator has no broker participant"
                )
            self.broker = broker.begin(self.gtrid)
            if self.debug:
                self.log.debug(events.BEGIN, participant=self.broker.name)
        return self.broker

    # -- ending ---------------------------------------------------------------

    def commit(self) -> Outcome:
        """Run the commit protocol; return COMMITTED, ABORTED or IN_DOUBT (never a guess)."""
        require(self.state, TxState.ACTIVE, action="commit", gtrid=self.gtrid)
        return self._host.finish(self, commit=True)

    def rollback(self, reason: str = "rolled back by the caller") -> Outcome:
        """Roll back every branch and the broker's transaction."""
        require(self.state, TxState.ACTIVE, action="roll back", gtrid=self.gtrid)
        self.reason = reason
        return self._host.finish(self, commit=False)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            if self.state is TxState.ACTIVE and isinstance(exc, Exception):
                self.rollback(f"{exc_type.__name__} in the transaction's work: {exc}")
            if self.timed_out and not isinstance(exc, TwoPhaseCommitError):
                # The watchdog cancelled the running statement: say why it failed.
                raise self.timeout_error() from exc
            return
        if self.state is TxState.ACTIVE:
            self.commit()
        if self.outcome is Outcome.ABORTED:
            raise TransactionAborted(self.gtrid, self.reason)
        if self.outcome is Outcome.IN_DOUBT:
            raise TransactionInDoubt(self.gtrid, self.reason)
        if self.outcome is Outcome.HEURISTIC_MIXED:
            raise HeuristicMixed(self.reason, participant=self.heuristic[0], gtrid=self.gtrid)
