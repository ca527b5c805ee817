"""One transfer as one global transaction over A, B and the broker, run by the coordinator.

Written once, for asyncio (``scenarios/strategies/transfer_2pc_aio.py``), from
which ``scripts/unasync.py`` generates the thread version
(``scenarios/strategies/transfer_2pc.py``): ``twopc transfer``, the stories and
the crash torture run that one, and the torture runs this one with
``--api asyncio``.
"""

from __future__ import annotations

from psycopg import errors as pg_errors

from coordinator.aio import AsyncCoordinator
from coordinator.errors import (
    HeuristicMixed,
    ParticipantError,
    TransactionAborted,
    TransactionInDoubt,
    TransactionTimeout,
)
from coordinator.states import Outcome
from coordinator.xid import gtrid_prefix
from scenarios.strategies.log_failure import stop_on_log_failure
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


async def transfer_2pc(
    coordinator: AsyncCoordinator, transfer: Transfer, *, end_a_work: bool = False
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
    the account and the database. Work that outlives the transaction's timeout
    is rolled back by the coordinator's watchdog (``TransactionTimeout``): aborted.
    """
    gtrid = gtrid_prefix(coordinator.coordinator_id) + transfer.transfer_id
    tx = coordinator.begin(gtrid)
    refused = False
    try:
        async with tx:
            try:
                debit = await tx.execute("a", DEBIT_TO, transfer.debit())
            except pg_errors.CheckViolation:
                refused = True  # the branch remembers the failure and votes NO at prepare
            else:
                require_applied(debit.rowcount, transfer.source, "a")
                if end_a_work:
                    await tx.end_work("a")  # a NO vote: PrepareFailed, the work rolled back
                credit = await tx.execute("b", CREDIT, transfer.credit())
                require_applied(credit.rowcount, transfer.target, "b")
                await tx.send(EVENT_TOPIC, transfer.body(), transfer.headers(TRANSFER_COMPLETED))
    except MissingAccount as exc:  # raised in the work: everything was rolled back
        return Outcome.ABORTED, str(exc)
    except TransactionAborted as exc:
        stop_on_log_failure(tx.log_failure, transfer, Outcome.ABORTED)
        if refused:
            return Outcome.ABORTED, exc.reason + await announce_refusal(coordinator, transfer)
        return Outcome.ABORTED, exc.reason
    except TransactionInDoubt as exc:
        stop_on_log_failure(tx.log_failure, transfer, Outcome.IN_DOUBT)
        return Outcome.IN_DOUBT, exc.reason
    except TransactionTimeout as exc:  # the watchdog rolled the work back, before any vote
        return Outcome.ABORTED, str(exc)
    except HeuristicMixed as exc:  # a branch's work committed on its own: not an abort
        return Outcome.HEURISTIC_MIXED, str(exc)
    except ParticipantError as exc:  # raised during the work: everything was rolled back
        return Outcome.ABORTED, str(exc)
    stop_on_log_failure(tx.log_failure, transfer, Outcome.COMMITTED)
    return Outcome.COMMITTED, ""


async def announce_refusal(coordinator: AsyncCoordinator, transfer: Transfer) -> str:
    """Publish the ``transfer.refused`` event of a transfer A refused for lack of funds.

    A transaction of its own, after the transfer's aborted (the broker its only
    writer: one COMMIT, no marker). The event records a fact and changes no state,
    so a broker that cannot take it costs the event only. Returns what to add to
    the abort reason: "" once published, else why not.
    """
    try:
        async with coordinator.begin() as tx:
            await tx.send(EVENT_TOPIC, transfer.body(), transfer.headers(TRANSFER_REFUSED))
    except (TransactionAborted, TransactionInDoubt, ParticipantError) as exc:
        return f" ({TRANSFER_REFUSED} not published: {exc})"
    return ""
