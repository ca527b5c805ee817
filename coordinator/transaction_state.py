"""The state of one global transaction, free of I/O: shared by the sync and asyncio APIs.

Every change of a transaction's state goes through these methods
(:meth:`TransactionState.handle`, :meth:`TransactionState.abandon_because`, ...),
called by the user, the driver and recovery. The work API on top
(:class:`~coordinator.transaction.Transaction`,
:class:`~coordinator.aio.transaction.AsyncTransaction`) adds branches and sends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from types import MappingProxyType
from typing import Generic, TypeVar

from coordinator import events, tracing
from coordinator.errors import DecisionLogError, TransactionTimeout
from coordinator.states import Outcome, TxEvent, TxState, next_state, require

BranchT = TypeVar("BranchT")
SessionT = TypeVar("SessionT")


class TransactionState(Generic[BranchT, SessionT]):
    """A global transaction's state, its branches so far and its broker session."""

    def __init__(self, gtrid: str, timeout: float) -> None:
        self.gtrid = gtrid
        self.state = TxState.ACTIVE
        self.outcome: Outcome | None = None
        self.reason = ""
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timed_out = False
        self._branches: dict[str, BranchT] = {}
        self.broker: SessionT | None = None
        self.messages_sent = 0
        self.marker_sent = False
        # The participant whose branch carries the decision row (docs/design.md §3), once written.
        self.decision_carrier: str | None = None
        # The decision-log error this transaction met, if any: before the commit point it
        # aborted it (or left it in doubt); after, the outcome stands and the backlog
        # writes the missing records. A caller running many transactions stops on it.
        self.log_failure: DecisionLogError | None = None
        # The participants whose work committed on its own (Outcome.HEURISTIC_MIXED).
        self.heuristic: tuple[str, ...] = ()
        self.timings: dict[str, float] = {}  # phase name -> seconds (for the benchmark)
        self._lock = threading.Lock()  # guards the branches against the watchdog
        self.log = events.get_logger(gtrid=gtrid)
        # Whether DEBUG events pass: per-step events are emitted only then (a flag test each).
        self.debug = events.enabled(self.log)
        self.span = tracing.start_transaction(gtrid)  # None unless a provider was seen

    @property
    def branches(self) -> Mapping[str, BranchT]:
        """The XA branches begun so far, by participant name (read-only)."""
        return MappingProxyType(self._branches)

    # -- state: every change goes through these ------------------------------------

    def handle(self, event: TxEvent) -> None:
        """Take the transition the table (:data:`~coordinator.states.TRANSITIONS`) gives
        ``event`` from the current state; InvalidTransition if there is none."""
        self.state = next_state(self.state, event, gtrid=self.gtrid)

    def abandon_because(self, reason: str) -> None:
        """Start rolling back, keeping the first reason given."""
        self.handle(TxEvent.ABANDON)
        self.reason = self.reason or reason

    def doubt_because(self, reason: str) -> None:
        """The commit point got no clear answer: the backlog or recovery decides."""
        self.handle(TxEvent.LOSE_ANSWER)
        self.reason = reason

    def decided(self, *, by_marker: bool) -> None:
        """The decision to commit is durable (the broker's marker, or the log)."""
        self.handle(TxEvent.DECIDE)
        self.marker_sent = self.marker_sent or by_marker

    def carries_decision(self, participant: str) -> None:
        """The decision row was written in ``participant``'s branch (not yet committed)."""
        self.decision_carrier = participant

    def finished(self, outcome: Outcome) -> None:
        """Record what the caller is told."""
        self.outcome = outcome
        tracing.end_transaction(self.span, outcome.value, self.reason)

    def time_out(self) -> list[BranchT]:
        """Mark the transaction as timed out; return the branches whose work to cancel."""
        self.timed_out = True
        with self._lock:
            return list(self._branches.values())

    def timed(self, phase: str) -> AbstractContextManager[None]:
        """Add the time spent in the block to ``timings[phase]`` (and trace it as a span)."""
        if self.span is not None:
            return self._timed_and_traced(phase)
        return _PhaseTimer(self.timings, phase)

    @contextmanager
    def _timed_and_traced(self, phase: str) -> Iterator[None]:
        with _PhaseTimer(self.timings, phase), tracing.phase(self.span, phase):
            yield

    def _check_active(self) -> None:
        if self.timed_out:
            raise TransactionTimeout(
                f"transaction {self.gtrid} exceeded its timeout and was rolled back"
            )
        require(self.state, TxState.ACTIVE, action="add work", gtrid=self.gtrid)

    def _add_branch(self, name: str, branch: BranchT) -> None:
        with self._lock:
            self._branches[name] = branch


class _PhaseTimer:
    """Adds the time spent in its block to ``timings[phase]``: a plain class, since it runs
    for every phase of every transaction (a generator-based context manager costs more)."""

    __slots__ = ("_phase", "_start", "_timings")

    def __init__(self, timings: dict[str, float], phase: str) -> None:
        self._timings = timings
        self._phase = phase
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        timings, phase = self._timings, self._phase
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - self._start
