"""The 2PC strategy: one global transaction over A, B and the broker, run by the coordinator."""

from __future__ import annotations

import time
from typing import Any

from psycopg import errors as pg_errors

from coordinator import failpoints
from coordinator.coordinator import Coordinator
from coordinator.errors import (
    ConfigurationError,
    CrashInjected,
    DecisionLogError,
    HeuristicMixed,
    ParticipantError,
    TransactionAborted,
    TransactionInDoubt,
)
from coordinator.states import Outcome
from coordinator.xid import gtrid_prefix
from scenarios.config import Settings
from scenarios.crash_plan import CrashAction
from scenarios.outbox.relay_modes import RelayMode
from scenarios.transfer.destinations import EVENT_QUEUES
from scenarios.transfer.model import (
    CREDIT,
    DEBIT_TO,
    EVENT_TOPIC,
    TRANSFER_COMPLETED,
    TRANSFER_REFUSED,
    MissingAccount,
    Transfer,
    require_applied,
)
from scenarios.wiring import open_coordinator


def transfer_2pc(
    coordinator: Coordinator, transfer: Transfer, *, end_a_work: bool = False
) -> tuple[Outcome, str]:
    """One transfer as one global transaction.

    ``end_a_work``: A's work is ended as soon as its debit is checked
    (``Transaction.end_work``), before B's credit runs: with other transfers in flight
    A is prepared then; the crash torture runs half of its transfers this way.

    The ``transfer.completed`` event goes to the events' virtual topic inside the
    transaction: it is published if and only if A and B commit.

    Insufficient funds in A is a NO vote at prepare; once the transaction has
    aborted, the refusal is published as a ``transfer.refused`` event
    (:func:`announce_refusal`). An account missing in A or B (its UPDATE touched
    no row) rolls the transaction back during the work, and the reason names
    the account and the database.
    """
    gtrid = gtrid_prefix(coordinator.coordinator_id) + transfer.transfer_id
    tx = coordinator.begin(gtrid)
    refused = False
    try:
        with tx:
            try:
                debited = tx.execute("a", DEBIT_TO, transfer.debit()).rowcount
            except pg_errors.CheckViolation:
                refused = True  # the branch remembers the failure and votes NO at prepare
            else:
                require_applied(debited, transfer.source, "a")
                if end_a_work:
                    tx.end_work("a")  # a NO vote: PrepareFailed, the work rolled back
                credited = tx.execute("b", CREDIT, transfer.credit()).rowcount
                require_applied(credited, transfer.target, "b")
                tx.send(EVENT_TOPIC, transfer.body(), transfer.headers(TRANSFER_COMPLETED))
    except MissingAccount as exc:  # raised in the work: everything was rolled back
        return Outcome.ABORTED, str(exc)
    except TransactionAborted as exc:
        _stop_on_log_failure(tx.log_failure, transfer, Outcome.ABORTED)
        if refused:
            return Outcome.ABORTED, exc.reason + announce_refusal(coordinator, transfer)
        return Outcome.ABORTED, exc.reason
    except TransactionInDoubt as exc:
        _stop_on_log_failure(tx.log_failure, transfer, Outcome.IN_DOUBT)
        return Outcome.IN_DOUBT, exc.reason
    except HeuristicMixed as exc:  # a branch's work committed on its own: not an abort
        return Outcome.HEURISTIC_MIXED, str(exc)
    except ParticipantError as exc:  # raised during the work: everything was rolled back
        return Outcome.ABORTED, str(exc)
    _stop_on_log_failure(tx.log_failure, transfer, Outcome.COMMITTED)
    return Outcome.COMMITTED, ""


def announce_refusal(coordinator: Coordinator, transfer: Transfer) -> str:
    """Publish the ``transfer.refused`` event of a transfer A refused for lack of funds.

    A transaction of its own, after the transfer's aborted (the broker its only
    writer: one COMMIT, no marker). The event records a fact and changes no state,
    so a broker that cannot take it costs the event only. Returns what to add to
    the abort reason: "" once published, else why not.
    """
    try:
        with coordinator.begin() as tx:
            tx.send(EVENT_TOPIC, transfer.body(), transfer.headers(TRANSFER_REFUSED))
    except (TransactionAborted, TransactionInDoubt, ParticipantError) as exc:
        return f" ({TRANSFER_REFUSED} not published: {exc})"
    return ""


class DecisionLogFailing(DecisionLogError):
    """A transfer met a decision log that cannot be written: a run of transfers stops."""


def _stop_on_log_failure(
    failure: DecisionLogError | None, transfer: Transfer, outcome: Outcome
) -> None:
    """Raise DecisionLogFailing if the transfer met a log failure (its outcome stands:
    the coordinator left nothing prepared that it could finish)."""
    if failure is None:
        return
    left = (
        "its branches stay prepared until 'twopc recover' reopens the log"
        if outcome is Outcome.IN_DOUBT
        else "nothing of it is left prepared"
    )
    raise DecisionLogFailing(
        f"{failure}; the run stopped there (that transfer {outcome.value}: {left})"
    ) from failure


class TwoPhaseCommitStrategy:
    """:func:`transfer_2pc` on a coordinator from :func:`scenarios.wiring.open_coordinator`.

    Crash points are the coordinator's failpoints; only ``kill`` is offered (an
    in-process crash leaves the coordinator's own sessions holding the broker
    client-ids that recovery must fence): run the transfers in a child process
    and then ``twopc recover``.
    """

    name = "2pc"
    relay_mode: RelayMode | None = None
    crash_points: tuple[str, ...] = failpoints.NAMES

    def __init__(self) -> None:
        self.committed_at: dict[str, float] = {}
        self.coordinator: Coordinator | None = None

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        from scenarios.outbox.fanout import ensure_queues

        self.close()
        ensure_queues(settings, EVENT_QUEUES)  # a queue created later misses the events before
        self.coordinator = open_coordinator(settings, sessions=max(concurrency, 1))

    def arm_crash(self, point: str, *, every: int = 1, action: CrashAction = "abandon") -> None:
        if action != "kill":
            raise ConfigurationError(
                "the 2pc strategy crashes only with action='kill' (in a child process; "
                "then run 'twopc recover')"
            )
        failpoints.arm(point, "kill", on_hit=every)

    def run_one(self, transfer: Transfer) -> tuple[Outcome, str]:
        if self.coordinator is None:
            raise RuntimeError("strategy 2pc: call prepare(settings) before run_one")
        try:
            outcome, reason = transfer_2pc(self.coordinator, transfer)
        except CrashInjected as exc:
            return Outcome.IN_DOUBT, f"crash injected: {exc}"
        if outcome is Outcome.COMMITTED:
            self.committed_at[transfer.transfer_id] = time.time()
        return outcome, reason

    def stats(self) -> dict[str, Any]:
        if self.coordinator is None:
            return {}
        return {"coordinator": dict(self.coordinator.stats())}

    def close(self) -> None:
        if self.coordinator is not None:
            self.coordinator.close()
            self.coordinator = None
