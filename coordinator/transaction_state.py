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
from typing import Any, Generic, TypeVar

from coordinator import events, tracing
from coordinator.errors import DecisionLogError, TransactionTimeout
from coordinator.states import (
    BEFORE_COMMIT_POINT,
    Outcome,
    TxEvent,
    TxState,
    next_state,
    require,
)

BranchT = TypeVar("BranchT")
SessionT = TypeVar("SessionT")

#: The branches of a transaction that has none yet: shared, read-only; the first one
#: added makes the transaction a dict of its own.
_NONE_YET: Mapping[str, Any] = MappingProxyType({})
#: Guards every transaction's branches, and its step to the commit point, against the
#: watchdog: held for a dict insert or copy or a state's check, never across I/O, so one
#: for the process rather than one per transaction.
_BRANCHES_LOCK = threading.Lock()


class TransactionState(Generic[BranchT, SessionT]):
    """A global transaction's state, its branches so far and its broker session."""

    # A coordinator may have thousands of transactions begun and waiting: each holds
    # only what it needs until it does some work. No __dict__; its logger is bound, and
    # its branch and phase dicts are made, on first use.
    __slots__ = (
        "_branches",
        "_log",
        "_timings",
        "broker",
        "debug",
        "decision_carrier",
        "gtrid",
        "heuristic",
        "log_failure",
        "marker_sent",
        "messages_sent",
        "outcome",
        "reason",
        "span",
        "started",
        "state",
        "timed_out",
        "timeout",
    )

    def __init__(self, gtrid: str, timeout: float) -> None:
        self.gtrid = gtrid
        self.state = TxState.ACTIVE
        self.outcome: Outcome | None = None
        self.reason = ""
        self.started = time.monotonic()
        self.timeout = timeout
        self.timed_out = False
        self._branches: Mapping[str, BranchT] = _NONE_YET
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
        self._timings: dict[str, float] | None = None  # made by the first phase timed
        self._log: Any = None  # bound with the gtrid on first use (see log)
        # Whether DEBUG events pass: per-step events are emitted only then (a flag test
        # each). Binding does not change a logger's level, so the unbound one answers.
        self.debug = events.enabled(events.get_logger())
        self.span = tracing.start_transaction(gtrid)  # None unless a provider was seen

    @property
    def deadline(self) -> float:
        """When the watchdog rolls the transaction back (``time.monotonic()`` seconds)."""
        return self.started + self.timeout

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase name (for the benchmark); a new empty dict until a phase is timed."""
        timings = self._timings
        return {} if timings is None else timings

    @property
    def log(self) -> Any:
        """The transaction's structlog logger, the gtrid bound (bound on first use)."""
        log = self._log
        if log is None:
            log = self._log = events.get_logger(gtrid=self.gtrid)
        return log

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
        """Mark the transaction as timed out; return the branches whose work to cancel.
        Nothing, and no mark, once it has stepped to its commit point: from there it
        decides, and a cancel would only hit its phase 2."""
        with _BRANCHES_LOCK:
            if self.state not in BEFORE_COMMIT_POINT:
                return []
            self.timed_out = True
            return list(self._branches.values())

    def reach_commit_point(self) -> bool:
        """Step to the commit point (REACH_COMMIT_POINT), unless the watchdog timed the
        transaction out first: then False, and it must abort. One or the other, never
        both (:meth:`time_out`)."""
        with _BRANCHES_LOCK:
            if self.timed_out:
                return False
            self.handle(TxEvent.REACH_COMMIT_POINT)
            return True

    def timed(self, phase: str) -> AbstractContextManager[None]:
        """Add the time spent in the block to ``timings[phase]`` (and trace it as a span)."""
        if self.span is not None:
            return self._timed_and_traced(phase)
        return _PhaseTimer(self, phase)

    @contextmanager
    def _timed_and_traced(self, phase: str) -> Iterator[None]:
        with _PhaseTimer(self, phase), tracing.phase(self.span, phase):
            yield

    def _check_active(self) -> None:
        if self.timed_out:
            raise self.timeout_error()
        require(self.state, TxState.ACTIVE, action="add work", gtrid=self.gtrid)

    def timeout_error(self) -> TransactionTimeout:
        """What the work of a transaction the watchdog rolled back raises."""
        return TransactionTimeout(
            f"transaction {self.gtrid} exceeded its timeout and was rolled back"
        )

    def _add_branch(self, name: str, branch: BranchT) -> None:
        with _BRANCHES_LOCK:
            branches = self._branches
            if isinstance(branches, dict):
                branches[name] = branch
            else:
                self._branches = {name: branch}

    def _add_time(self, phase: str, seconds: float) -> None:
        timings = self._timings
        if timings is None:
            self._timings = {phase: seconds}
        else:
            timings[phase] = timings.get(phase, 0.0) + seconds


class _PhaseTimer:
    """Adds the time spent in its block to ``timings[phase]``: a plain class, since it runs
    for every phase of every transaction (a generator-based context manager costs more)."""

    __slots__ = ("_phase", "_start", "_tx")

    def __init__(self, tx: TransactionState[Any, Any], phase: str) -> None:
        self._tx = tx
        self._phase = phase
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._tx._add_time(self._phase, time.perf_counter() - self._start)
