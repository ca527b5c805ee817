"""One global transaction as its user sees it: branches, broker sends, commit on exit.

The transaction holds its own state; every change of it goes through its
methods (:meth:`Transaction.move`, :meth:`Transaction.abandon_because`, ...),
called by the user, the driver and recovery. It knows its coordinator only
through :class:`TransactionHost`, so this module imports no coordinator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType, TracebackType
from typing import Any, Protocol

import psycopg
from psycopg.abc import Params, Query

from coordinator import events, tracing
from coordinator.errors import (
    TransactionAborted,
    TransactionInDoubt,
    TransactionTimeout,
    TwoPhaseCommitError,
    UnknownParticipant,
)
from coordinator.protocol import LastResource, LastResourceSession, XABranch, XAResource
from coordinator.states import Outcome, TxState, check_transition, require
from coordinator.xid import Xid


class TransactionHost(Protocol):
    """What a transaction needs from the coordinator that runs it."""

    @property
    def resources(self) -> Mapping[str, XAResource]: ...

    @property
    def broker(self) -> LastResource | None: ...

    def finish(self, tx: Transaction, *, commit: bool) -> Outcome: ...

    def failpoint(self, name: str) -> None: ...


class Transaction:
    """A global transaction: hands out branches lazily, commits atomically.

    Use it as a context manager: leaving the block normally commits and raises
    TransactionAborted or TransactionInDoubt unless the outcome is COMMITTED;
    leaving it with an exception rolls everything back and lets it propagate.
    """

    def __init__(self, host: TransactionHost, gtrid: str, timeout: float) -> None:
        self._host = host
        self.gtrid = gtrid
        self.state = TxState.ACTIVE
        self.outcome: Outcome | None = None
        self.reason = ""
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timed_out = False
        self._branches: dict[str, XABranch] = {}
        self.broker: LastResourceSession | None = None
        self.messages_sent = 0
        self.marker_sent = False
        # The participant whose branch carries the decision row (DESIGN §7), once written.
        self.decision_holder: str | None = None
        self.timings: dict[str, float] = {}  # phase name -> seconds (for the benchmark)
        self._lock = threading.Lock()  # guards branch creation against the watchdog
        self.log = events.get_logger(gtrid=gtrid)
        self.span = tracing.start_transaction(gtrid)  # None without OpenTelemetry

    @property
    def branches(self) -> Mapping[str, XABranch]:
        """The XA branches begun so far, by participant name (read-only)."""
        return MappingProxyType(self._branches)

    # -- state: every change goes through these ------------------------------------

    def move(self, target: TxState) -> None:
        """Go to ``target`` if the transition table allows it."""
        self.state = check_transition(self.state, target, gtrid=self.gtrid)

    def abandon_because(self, reason: str) -> None:
        """Start rolling back, keeping the first reason given."""
        self.move(TxState.ABORTING)
        self.reason = self.reason or reason

    def doubt_because(self, reason: str) -> None:
        """The commit point got no clear answer: recovery decides."""
        self.move(TxState.IN_DOUBT)
        self.reason = reason

    def decided(self, *, by_marker: bool) -> None:
        """The decision to commit is durable (the broker's marker, or the log)."""
        self.move(TxState.COMMITTED)
        self.marker_sent = self.marker_sent or by_marker

    def carries_decision(self, participant: str) -> None:
        """The decision row was written in ``participant``'s branch (not yet committed)."""
        self.decision_holder = participant

    def finished(self, outcome: Outcome) -> None:
        """Record what the caller is told."""
        self.outcome = outcome
        tracing.end_transaction(self.span, outcome.value, self.reason)

    def time_out(self) -> list[XABranch]:
        """Mark the transaction as timed out; return the branches whose work to cancel."""
        self.timed_out = True
        with self._lock:
            return list(self._branches.values())

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the time spent in the block to ``timings[phase]`` (and trace it as a span)."""
        start = time.perf_counter()
        try:
            with tracing.phase(self.span, phase):
                yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    def _check_active(self) -> None:
        if self.timed_out:
            raise TransactionTimeout(
                f"transaction {self.gtrid} exceeded its timeout and was rolled back"
            )
        require(self.state, TxState.ACTIVE, action="add work", gtrid=self.gtrid)

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
        with self._lock:
            branch = resource.begin(Xid.branch(self.gtrid, name))
            self._branches[name] = branch
        self.log.debug(events.BEGIN, participant=name)
        self._host.failpoint("after_begin")
        return branch

    def execute(self, name: str, query: Query, params: Params | None = None) -> psycopg.Cursor[Any]:
        """Run one statement on branch ``name``; returns its psycopg cursor."""
        return self.branch(name).execute(query, params)

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
        self._broker_session().ack(ack_id)

    def _broker_session(self) -> LastResourceSession:
        self._check_active()
        if self.broker is None:
            broker = self._host.broker
            if broker is None:
                raise UnknownParticipant(
                    f"transaction {self.gtrid}: this coordinator has no broker participant"
                )
            self.broker = broker.begin(self.gtrid)
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
                raise TransactionTimeout(
                    f"transaction {self.gtrid} exceeded its timeout and was rolled back"
                ) from exc
            return
        if self.state is TxState.ACTIVE:
            self.commit()
        if self.outcome is Outcome.ABORTED:
            raise TransactionAborted(self.gtrid, self.reason)
        if self.outcome is Outcome.IN_DOUBT:
            raise TransactionInDoubt(self.gtrid, self.reason)
