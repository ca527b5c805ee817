"""Transaction states, events, votes and outcomes, and the one table of transitions (no I/O)."""

from __future__ import annotations

import enum

from coordinator.errors import InvalidTransition


class Vote(enum.Enum):
    """A participant's answer to prepare: YES is the only answer; a NO vote is
    :class:`~coordinator.errors.PrepareFailed`, raised."""

    YES = "yes"


class Outcome(enum.Enum):
    """What the caller is told: never a guess."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_DOUBT = "in-doubt"
    #: Rolled back, but the work of some participants (``Transaction.heuristic``) had
    #: committed on its own before: a COMMIT run inside their branch. Their databases
    #: hold that work and the others do not; only a person can reconcile them.
    HEURISTIC_MIXED = "heuristic-mixed"


class TxState(enum.Enum):
    """Where one global transaction stands in the protocol."""

    ACTIVE = "active"  # work in progress on the branches
    PREPARING = "preparing"  # phase 1 sent to the XA branches
    COMMITTING = "committing"  # commit point under way (broker COMMIT or forced log write)
    COMMITTED = "committed"  # decision durable; phase 2 may still be running
    ABORTING = "aborting"  # rolling back whatever was begun or prepared
    ABORTED = "aborted"  # every branch rolled back (or presumed so)
    IN_DOUBT = "in-doubt"  # the commit point got no answer; recovery decides
    COMPLETED = "completed"  # phase 2 done everywhere, END recorded


class TxEvent(enum.Enum):
    """What happens to a global transaction; :data:`TRANSITIONS` says where each leads."""

    PREPARE = "prepare"  # phase 1 is sent to the XA branches
    REACH_COMMIT_POINT = "reach the commit point"  # the broker's COMMIT, the row or the record
    DECIDE = "decide"  # the decision to commit is durable
    LOSE_ANSWER = "lose the answer"  # the commit point got no clear answer
    ABANDON = "roll back"  # rolling back begins (the caller, a NO vote, a refusal)
    ROLLED_BACK = "finish rolling back"  # every branch rolled back (or presumed so)
    END = "end"  # phase 2 done everywhere, END recorded


#: The one table of transitions, as h11's: state -> event -> next state. An event
#: not listed for a state is refused (InvalidTransition). ACTIVE -> COMMITTING is the
#: one-phase path (read-only or single-writer transactions skip phase 1). IN_DOUBT ends
#: the transaction's own story: what its gtrid became is decided later, by the backlog
#: or recovery (docs/design.md §5), and reported to the coordinator's listeners; the
#: caller's transaction never changes after the caller has its outcome.
TRANSITIONS: dict[TxState, dict[TxEvent, TxState]] = {
    TxState.ACTIVE: {
        TxEvent.PREPARE: TxState.PREPARING,
        TxEvent.REACH_COMMIT_POINT: TxState.COMMITTING,
        TxEvent.ABANDON: TxState.ABORTING,
    },
    TxState.PREPARING: {
        TxEvent.REACH_COMMIT_POINT: TxState.COMMITTING,
        TxEvent.ABANDON: TxState.ABORTING,
    },
    TxState.COMMITTING: {
        TxEvent.DECIDE: TxState.COMMITTED,
        TxEvent.ABANDON: TxState.ABORTING,
        TxEvent.LOSE_ANSWER: TxState.IN_DOUBT,
    },
    TxState.COMMITTED: {TxEvent.END: TxState.COMPLETED},
    TxState.ABORTING: {TxEvent.ROLLED_BACK: TxState.ABORTED},
    TxState.IN_DOUBT: {},
    TxState.ABORTED: {},
    TxState.COMPLETED: {},
}

TERMINAL: frozenset[TxState] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)

#: Before the commit point: the work, and phase 1 (where deferred work goes out with the
#: PREPARE and may wait for a lock). A failure there aborts, and the timeout watchdog
#: cancels the statements of a transaction there past its deadline: it never reaches its
#: commit point (the driver checks the deadline after phase 1), so what a cancel
#: interrupts is only rolled back.
BEFORE_COMMIT_POINT: frozenset[TxState] = frozenset({TxState.ACTIVE, TxState.PREPARING})


def next_state(current: TxState, event: TxEvent, *, gtrid: str = "?") -> TxState:
    """Where ``event`` takes a transaction in state ``current``; InvalidTransition if
    the table does not allow it."""
    target = TRANSITIONS[current].get(event)
    if target is None:
        raise InvalidTransition(f"cannot {event.value}: transaction {gtrid} is {current.value}")
    return target


def require(current: TxState, allowed: TxState, *, action: str, gtrid: str) -> None:
    """Guard a caller's request: raise InvalidTransition unless the state is ``allowed``.

    The message names the request and the state, as psycopg's guards do:
    "cannot commit: transaction twopc.1f2e is committing".
    """
    if current is not allowed:
        raise InvalidTransition(f"cannot {action}: transaction {gtrid} is {current.value}")
