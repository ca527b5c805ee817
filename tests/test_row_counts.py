"""A deferred statement given the row count it must touch (``defer(..., rows=N)``), sync and
asyncio: another count is the branch's failure (WrongRowCount, naming the participant and
the gtrid), raised at flush or voted NO at prepare, and nothing commits or stays prepared,
also when the PREPARE or the one-phase COMMIT went in the same pipeline."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator import Outcome
from coordinator.errors import PrepareFailed, WrongRowCount
from scenarios.config import Settings
from tests.test_vote import INSERT, TABLE, assert_nothing_prepared, count
from tests.test_vote import coordinator as coordinator
from tests.test_vote import ledger as ledger

#: One more to the amount of the rows of one id: touches as many rows as the id has.
BUMP = f"UPDATE {TABLE} SET amount = amount + 1 WHERE id = %s"


def _assert_names(error: WrongRowCount, gtrid: str, *, touched: int) -> None:
    assert (error.participant, error.gtrid, error.required, error.touched) == (
        "a",
        gtrid,
        1,
        touched,
    )
    assert "'a'" in str(error) and gtrid in str(error) and "UPDATE" in str(error)


@pytest.mark.lab
def test_statements_that_touch_their_row_count_commit(coordinator: Any, settings: Settings) -> None:
    """Counted statements on A and B, sent with their PREPARE, commit as uncounted ones do."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(INSERT, (tx.gtrid, 1), rows=1)
    a.defer(BUMP, (tx.gtrid,), rows=1)
    tx.branch("b").defer(INSERT, (tx.gtrid, 3), rows=1)
    assert tx.commit() is Outcome.COMMITTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 1)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_wrong_row_count_raises_at_flush_and_the_branch_votes_no(
    coordinator: Any, settings: Settings
) -> None:
    """An UPDATE of a missing row given rows=1: flush raises WrongRowCount naming 'a', the
    gtrid and the statement; the transaction then aborts with nothing written anywhere."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(INSERT, (tx.gtrid, 1))
    a.defer(BUMP, (tx.gtrid + "-missing",), rows=1)
    with pytest.raises(WrongRowCount) as wrong:
        a.flush()
    _assert_names(wrong.value, tx.gtrid, touched=0)
    tx.execute("b", INSERT, (tx.gtrid, 2))
    assert tx.commit() is Outcome.ABORTED
    assert "'a' voted NO" in tx.reason and "must touch 1 row(s)" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_wrong_row_count_sent_with_the_prepare_is_a_no_vote_and_nothing_stays_prepared(
    coordinator: Any, settings: Settings
) -> None:
    """Two rows where one is required, read with A's PREPARE at phase 1: the server ran the
    PREPARE after it, and the branch votes NO and rolls it back: nothing is committed or
    prepared in A or B."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(INSERT, (tx.gtrid, 1))
    a.defer(INSERT, (tx.gtrid, 2))
    a.defer(BUMP, (tx.gtrid,), rows=1)
    tx.branch("b").defer(INSERT, (tx.gtrid, 3))
    assert tx.commit() is Outcome.ABORTED
    assert "voted NO" in tx.reason and "its answer says 2 row(s)" in tx.reason
    assert "participant 'a'" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_wrong_row_count_prepared_early_raises_a_no_vote_with_it_as_cause(
    coordinator: Any, settings: Settings
) -> None:
    """prepare_now() with a counted UPDATE of a missing row: PrepareFailed naming 'a', its
    cause the WrongRowCount; the PREPARE that ran is rolled back and the transaction aborts."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(INSERT, (tx.gtrid, 1))
    a.defer(BUMP, (tx.gtrid + "-missing",), rows=1)
    with pytest.raises(PrepareFailed) as refused:
        a.prepare_now()
    assert "'a'" in str(refused.value) and tx.gtrid in str(refused.value)
    assert isinstance(refused.value.__cause__, WrongRowCount)
    _assert_names(refused.value.__cause__, tx.gtrid, touched=0)
    assert_nothing_prepared(settings, tx.gtrid)
    tx.branch("b").defer(INSERT, (tx.gtrid, 3))
    assert tx.commit() is Outcome.ABORTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_the_only_writer_reads_its_row_counts_before_its_one_phase_commit(
    coordinator: Any, settings: Settings
) -> None:
    """One branch, committed one-phase: with the right count it commits; with a wrong one
    the commit is refused naming the count, and the work is not committed (the COMMIT did
    not go with it)."""
    good = coordinator.begin()
    good.branch("a").defer(INSERT, (good.gtrid, 1), rows=1)
    assert good.commit() is Outcome.COMMITTED
    assert count(settings.pg_a, good.gtrid) == 1
    bad = coordinator.begin()
    bad.branch("a").defer(INSERT, (bad.gtrid, 1))
    bad.branch("a").defer(BUMP, (bad.gtrid + "-missing",), rows=1)
    assert bad.commit() is Outcome.ABORTED
    assert "'a'" in bad.reason and "must touch 1 row(s)" in bad.reason
    assert count(settings.pg_a, bad.gtrid) == 0
    assert_nothing_prepared(settings, bad.gtrid)
