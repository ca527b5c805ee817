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
from coordinator.aio.transaction import AsyncTransaction
from coordinator.errors import (
    HeuristicMixed,
    ParticipantError,
    TransactionAborted,
    TransactionInDoubt,
    TransactionTimeout,
    WrongRowCount,
)
from coordinator.states import Outcome
from coordinator.xid import gtrid_prefix
from participants.aio.pg_branch import AsyncPostgresBranch
from scenarios.strategies.log_failure import stop_on_log_failure
from scenarios.transfer.model import (
    CREDIT,
    DEBIT_TO,
    EVENT_TOPIC,
    TRANSFER_COMPLETED,
    TRANSFER_REFUSED,
    MissingAccount,
    Transfer,
)


async def transfer_2pc(
    coordinator: AsyncCoordinator, transfer: Transfer, *, end_a_work: bool = False
) -> tuple[Outcome, str]:
    """One transfer as one global transaction.

    A's debit goes with A's BEGIN in one round trip (``defer`` then ``flush``), and B's
    credit with B's BEGIN in one more, once A's answer is in: every transfer takes A's
    locks before B's (work on two databases at once can deadlock). A and B then
    prepare side by side at phase 1. ``end_a_work`` ends A's work before B's credit
    (``Transaction.end_work``: with other transfers in flight A is prepared then, one
    round trip more); the crash torture runs half of its transfers that way. No
    PREPARE goes in one pipeline with the work: sent behind the work, the torture's
    connection resets hung a batch (docs/design.md §2, "A PREPARE behind work that
    waits").

    The ``transfer.completed`` event goes to the events' virtual topic inside the
    transaction: it is published if and only if A and B commit.

    Each UPDATE must touch its account's one row (``defer(..., rows=1)``): an account
    missing in A or B rolls the transaction back during the work, and the reason
    names the account and the database. Insufficient funds in A is a NO vote; once
    the transaction has aborted, the refusal is published as a ``transfer.refused``
    event (:func:`announce_refusal`). Work that outlives the transaction's timeout is
    rolled back by the coordinator's watchdog (``TransactionTimeout``): aborted.
    """
    gtrid = gtrid_prefix(coordinator.coordinator_id) + transfer.transfer_id
    tx = coordinator.begin(gtrid)
    refused = False
    try:
        async with tx:
            a = await postgres_branch(tx, "a")
            a.defer(DEBIT_TO, transfer.debit(), rows=1)
            try:
                await a.flush()
                if end_a_work:
                    await tx.end_work("a")
            except pg_errors.CheckViolation:  # raised by the flush: insufficient funds
                refused = True  # the branch votes NO: B's work is not sent
            else:
                b = await postgres_branch(tx, "b")
                b.defer(CREDIT, transfer.credit(), rows=1)
                await b.flush()
                await tx.send(EVENT_TOPIC, transfer.body(), transfer.headers(TRANSFER_COMPLETED))
    except WrongRowCount as exc:  # raised in the work: everything was rolled back
        account = transfer.source if exc.participant == "a" else transfer.target
        return Outcome.ABORTED, str(MissingAccount(account, exc.participant))
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


async def postgres_branch(tx: AsyncTransaction, name: str) -> AsyncPostgresBranch:
    """Branch ``name`` of ``tx``, which must be PostgreSQL's (its work is deferred)."""
    branch = await tx.branch(name)
    if not isinstance(branch, AsyncPostgresBranch):
        raise TypeError(
            f"transaction {tx.gtrid}: participant {name!r} is {type(branch).__name__}, "
            "not a PostgreSQL branch: the transfer defers its work"
        )
    return branch


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
