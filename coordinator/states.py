"""Transaction states, votes and outcomes, and the one table of allowed transitions (no I/O)."""

from __future__ import annotations

import enum

from coordinator.errors import InvalidTransition


class Vote(enum.Enum):
    """A participant's answer to prepare."""

    YES = "yes"
    NO = "no"
    READ_ONLY = "read-only"


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


#: The allowed transitions. ACTIVE -> COMMITTING is the one-phase path
#: (read-only or single-writer transactions skip phase 1).
TRANSITIONS: dict[TxState, frozenset[TxState]] = {
    TxState.ACTIVE: frozenset({TxState.PREPARING, TxState.COMMITTING, TxState.ABORTING}),
    TxState.PREPARING: frozenset({TxState.COMMITTING, TxState.ABORTING}),
    TxState.COMMITTING: frozenset({TxState.COMMITTED, TxState.ABORTING, TxState.IN_DOUBT}),
    TxState.COMMITTED: frozenset({TxState.COMPLETED}),
    TxState.ABORTING: frozenset({TxState.ABORTED}),
    TxState.IN_DOUBT: frozenset({TxState.COMMITTED, TxState.ABORTING}),
    TxState.ABORTED: frozenset(),
    TxState.COMPLETED: frozenset(),
}

TERMINAL: frozenset[TxState] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


def check_transition(current: TxState, target: TxState, *, gtrid: str = "?") -> TxState:
    """Return ``target`` if ``current -> target`` is allowed, else raise InvalidTransition."""
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(
            f"cannot go from {current.value} to {target.value}: transaction {gtrid} is "
            f"{current.value}"
        )
    return target


def require(current: TxState, allowed: TxState, *, action: str, gtrid: str) -> None:
    """Guard a caller's request: raise InvalidTransition unless the state is ``allowed``.

    The message names the request and the state, as psycopg's guards do:
    "cannot commit: transaction twopc.1f2e is committing".
    """
    if current is not allowed:
        raise InvalidTransition(f"cannot {action}: transaction {gtrid} is {current.value}")
