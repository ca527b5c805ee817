"""One global transaction as its user sees it: branches, broker sends, commit on exit."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from coordinator import events
from coordinator.errors import (
    TransactionAborted,
    TransactionInDoubt,
    TransactionTimeout,
    TwoPhaseCommitError,
    UnknownParticipant,
)
from coordinator.protocol import LastResourceSession, XABranch
from coordinator.states import Outcome, TxState, check_transition, outcome_of
from coordinator.xid import Xid

if TYPE_CHECKING:
    from coordinator.coordinator import Coordinator


class Transaction:
    """A global transaction: hands out branches lazily, commits atomically.

    Use it as a context manager: leaving the block normally commits and raises
    TransactionAborted or TransactionInDoubt unless the outcome is COMMITTED;
    leaving it with an exception rolls everything back and lets it propagate.
    """

    def __init__(self, coordinator: Coordinator, gtrid: str, timeout: float) -> None:
        self.coordinator = coordinator
        self.gtrid = gtrid
        self.state = TxState.ACTIVE
        self.outcome: Outcome | None = None
        self.reason = ""
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timed_out = False
        self.branches: dict[str, XABranch] = {}
        self.broker: LastResourceSession | None = None
        self.messages_sent = 0
        self.marker_sent = False
        self.timings: dict[str, float] = {}  # phase name -> seconds (for the benchmark)
        self.lock = threading.Lock()  # guards branch creation against the watchdog
        self.log = events.get_logger(gtrid=gtrid)

    # -- state ----------------------------------------------------------------

    def move(self, target: TxState) -> None:
        """Go to ``target`` if the transition table allows it."""
        self.state = check_transition(self.state, target, gtrid=self.gtrid)

    def _check_active(self) -> None:
        if self.timed_out:
            raise TransactionTimeout(
                f"transaction {self.gtrid} exceeded its timeout and was rolled back"
            )
        if self.state is not TxState.ACTIVE:
            raise TwoPhaseCommitError(
                f"transaction {self.gtrid} is {self.state.value}; no more work can be added"
            )

    # -- work -----------------------------------------------------------------

    def branch(self, name: str) -> Any:
        """The branch on database ``name`` ('a', 'b', ...), begun on first use."""
        self._check_active()
        found = self.branches.get(name)
        if found is not None:
            return found
        resource = self.coordinator.resources.get(name)
        if resource is None:
            known = ", ".join(sorted(self.coordinator.resources)) or "none"
            raise UnknownParticipant(
                f"transaction {self.gtrid}: no participant named {name!r} (known: {known})"
            )
        with self.lock:
            branch = resource.begin(Xid.branch(self.gtrid, name))
            self.branches[name] = branch
        self.log.debug(events.BEGIN, participant=name)
        self.coordinator.failpoint("after_begin")
        return branch

    def execute(self, name: str, query: Any, params: Any = None) -> Any:
        """Run one statement on branch ``name``; returns the psycopg cursor."""
        return self.branch(name).execute(query, params)

    def send(self, destination: str, body: str, headers: Mapping[str, str] | None = None) -> None:
        """Send a persistent message inside the broker's transaction."""
        self._check_active()
        if self.broker is None:
            if self.coordinator.broker is None:
                raise UnknownParticipant(
                    f"transaction {self.gtrid}: this coordinator has no broker participant"
                )
            self.broker = self.coordinator.broker.begin(self.gtrid)
            self.log.debug(events.BEGIN, participant=self.broker.name)
        self.broker.send(destination, body, headers)
        self.messages_sent += 1

    # -- ending ---------------------------------------------------------------

    def commit(self) -> Outcome:
        """Run the commit protocol; return COMMITTED, ABORTED or IN_DOUBT (never a guess)."""
        if self.state is not TxState.ACTIVE:
            raise TwoPhaseCommitError(f"transaction {self.gtrid} is already {self.state.value}")
        return self.coordinator.finish(self, commit=True)

    def rollback(self, reason: str = "rolled back by the caller") -> Outcome:
        """Roll back every branch and the broker's transaction."""
        if self.state is not TxState.ACTIVE:
            raise TwoPhaseCommitError(f"transaction {self.gtrid} is already {self.state.value}")
        self.reason = reason
        return self.coordinator.finish(self, commit=False)

    def result(self) -> Outcome:
        return outcome_of(self.state)

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
