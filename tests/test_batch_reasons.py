"""A batch counts its aborts by cause: the first line of the reason, without the transfer's id."""

from __future__ import annotations

from coordinator.states import Outcome
from scenarios.transfer.batch import run_batch
from scenarios.transfer.model import Transfer, plan


def test_aborts_with_one_cause_count_together_and_name_the_error() -> None:
    """Refusals whose reasons differ only in the transfer id and the DETAIL line count as one."""

    def refuse(transfer: Transfer) -> tuple[Outcome, str]:
        if transfer.amount % 2:
            return Outcome.COMMITTED, ""
        return (
            Outcome.ABORTED,
            f"participant 'a' voted NO (transaction w1.{transfer.transfer_id}): new row for "
            'relation "accounts" violates check constraint "accounts_balance_check"\n'
            f"DETAIL:  Failing row contains ({transfer.source}, -{transfer.amount}).",
        )

    transfers = plan(200, accounts=10, seed=3)
    result = run_batch(transfers, refuse, concurrency=4)
    refused = sum(1 for t in transfers if t.amount % 2 == 0)
    assert refused > 0
    assert result.as_dict()["abort_reasons"] == {
        "participant 'a' voted NO (transaction w1.…): new row for relation \"accounts\" "
        'violates check constraint "accounts_balance_check"': refused
    }
