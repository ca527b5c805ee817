"""Work deferred on a PostgreSQL branch goes out in pipeline mode with the branch's PREPARE
(sync and asyncio), at phase 1 or early (prepare_now): it commits like executed work, and a
failing statement is a NO vote naming the participant and the gtrid, with nothing committed
and nothing left prepared."""

from __future__ import annotations

import inspect
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from coordinator import Outcome, events
from coordinator.errors import InvalidTransition, PrepareFailed
from coordinator.xid import Xid
from participants.pg_commands import gid_of
from scenarios.config import Settings
from scenarios.log_setup import configure as configure_logging
from tests.test_vote import (
    INSERT,
    TABLE,
    assert_nothing_prepared,
    count,
    gtrid_of_gid,
    prepared_gids,
)
from tests.test_vote import coordinator as coordinator
from tests.test_vote import ledger as ledger

#: A statement that fails in the server: NULL into the NOT NULL id.
FAILING = f"INSERT INTO {TABLE} VALUES (NULL, %s)"


@pytest.mark.lab
def test_deferred_work_commits_with_the_prepare(coordinator: Any, settings: Settings) -> None:
    """Statements deferred on A and B are sent with their PREPARE and commit: both rows are
    there, and nothing stays prepared."""
    tx = coordinator.begin()
    tx.branch("a").defer(INSERT, (tx.gtrid, 1))
    tx.branch("a").defer(INSERT, (tx.gtrid, 2))
    tx.branch("b").defer(INSERT, (tx.gtrid, 3))
    assert tx.commit() is Outcome.COMMITTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (2, 1)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_failure_in_the_middle_of_deferred_work_is_a_no_vote(
    coordinator: Any, settings: Settings
) -> None:
    """A constraint violation between two deferred statements on B: B votes NO naming 'b' and
    the gtrid with the server's error; neither A's work nor B's first row commits."""
    tx = coordinator.begin()
    tx.execute("a", INSERT, (tx.gtrid, 1))
    b = tx.branch("b")
    b.defer(INSERT, (tx.gtrid, 1))
    b.defer(FAILING, (2,))
    b.defer(INSERT, (tx.gtrid, 3))
    assert tx.commit() is Outcome.ABORTED
    assert "'b'" in tx.reason and tx.gtrid in tx.reason and "not-null" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_statement_after_a_failed_flush_is_refused_and_the_branch_votes_no(
    coordinator: Any, settings: Settings
) -> None:
    """flush() raises the failed deferred statement's error; a statement after it fails (the
    transaction is aborted), and the outcome is ABORTED with nothing committed."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(FAILING, (1,))
    with pytest.raises(psycopg.errors.NotNullViolation):
        a.flush()
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        a.execute(INSERT, (tx.gtrid, 2))
    tx.execute("b", INSERT, (tx.gtrid, 3))
    assert tx.commit() is Outcome.ABORTED
    assert "'a'" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_execute_after_deferred_work_runs_it_first_and_raises_its_error(
    coordinator: Any, settings: Settings
) -> None:
    """execute() sends the deferred statements before its own: their failure is raised there,
    and the transaction aborts."""
    tx = coordinator.begin()
    b = tx.branch("b")
    b.defer(FAILING, (1,))
    with pytest.raises(psycopg.errors.NotNullViolation):
        b.execute(INSERT, (tx.gtrid, 2))
    assert tx.commit() is Outcome.ABORTED
    assert count(settings.pg_b, tx.gtrid) == 0
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_deferred_work_on_the_only_writer_commits_one_phase(
    coordinator: Any, settings: Settings
) -> None:
    """One branch with deferred work commits one-phase with its COMMIT in the pipeline; a
    deferred failure there refuses the commit and nothing is written."""
    good = coordinator.begin()
    good.branch("a").defer(INSERT, (good.gtrid, 1))
    assert good.commit() is Outcome.COMMITTED
    assert count(settings.pg_a, good.gtrid) == 1
    bad = coordinator.begin()
    bad.branch("a").defer(INSERT, (bad.gtrid, 1))
    bad.branch("a").defer(FAILING, (2,))
    assert bad.commit() is Outcome.ABORTED
    assert "'a'" in bad.reason and "not-null" in bad.reason
    assert count(settings.pg_a, bad.gtrid) == 0


@pytest.mark.lab
def test_defer_refuses_transaction_control(coordinator: Any, settings: Settings) -> None:
    """defer("COMMIT") raises at once, naming the participant and the gtrid; the transaction
    goes on and commits its other work."""
    tx = coordinator.begin()
    with pytest.raises(InvalidTransition, match="'a'") as refused:
        tx.branch("a").defer("commit")
    assert tx.gtrid in str(refused.value)
    tx.branch("a").defer(INSERT, (tx.gtrid, 1))
    tx.execute("b", INSERT, (tx.gtrid, 2))
    assert tx.commit() is Outcome.COMMITTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 1)


def _on_conn(coordinator: Any, branch: Any, query: str, params: Any) -> None:
    """Run ``query`` on the branch's own connection, as an ORM does (awaited under asyncio)."""
    result = branch.conn.execute(query, params)
    if inspect.isawaitable(result):
        coordinator._portal.run(result)


@pytest.mark.lab
def test_work_on_the_branch_connection_itself_commits(coordinator: Any, settings: Settings) -> None:
    """B's only work goes through its branch's connection (as an ORM's does): B is not taken
    for read-only, it prepares and commits with A."""
    tx = coordinator.begin()
    tx.execute("a", INSERT, (tx.gtrid, 1))
    _on_conn(coordinator, tx.branch("b"), INSERT, (tx.gtrid, 2))
    assert tx.commit() is Outcome.COMMITTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 1)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_failure_on_the_branch_connection_itself_is_a_no_vote(
    coordinator: Any, settings: Settings
) -> None:
    """B's work fails on its branch's connection: B votes NO and A's work does not commit."""
    tx = coordinator.begin()
    tx.execute("a", INSERT, (tx.gtrid, 1))
    with pytest.raises(psycopg.errors.NotNullViolation):
        _on_conn(coordinator, tx.branch("b"), FAILING, (2,))
    assert tx.commit() is Outcome.ABORTED
    assert "'b'" in tx.reason and tx.gtrid in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


# -- a branch prepared early (prepare_now) ----------------------------------------------


@pytest.mark.lab
def test_a_branch_prepared_early_is_prepared_before_the_commit_and_commits(
    coordinator: Any, settings: Settings
) -> None:
    """prepare_now() sends A's deferred work with its PREPARE: A's branch is prepared in the
    server before the commit (the check of prepared branches sees it), phase 1's event names
    it as prepared early, then A and B commit and nothing stays prepared."""
    configure_logging("DEBUG")  # per-step events pass: the transaction asks at its begin
    try:
        with capture_logs() as logs:
            tx = coordinator.begin()
            a = tx.branch("a")
            a.defer(INSERT, (tx.gtrid, 1))
            a.prepare_now()
            assert gtrid_of_gid(gid_of(Xid.branch(tx.gtrid, "a"))) == tx.gtrid
            assert tx.gtrid in {gtrid_of_gid(g) for g in prepared_gids(settings.pg_a)}
            with pytest.raises(AssertionError):
                assert_nothing_prepared(settings, tx.gtrid)
            tx.branch("b").defer(INSERT, (tx.gtrid, 2))
            assert tx.commit() is Outcome.COMMITTED
    finally:
        configure_logging()
    started = [e for e in logs if e["event"] == events.PREPARE_STARTED]
    assert [(e["participants"], e["prepared_early"]) for e in started] == [(["a", "b"], ["a"])]
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 1)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_failure_prepared_early_raises_a_no_vote_naming_the_branch(
    coordinator: Any, settings: Settings
) -> None:
    """A deferred statement that fails at prepare_now() raises PrepareFailed naming 'a' and
    the gtrid, with the server's error as its cause; the transaction aborts with nothing
    committed or prepared."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(INSERT, (tx.gtrid, 1))
    a.defer(FAILING, (2,))
    with pytest.raises(PrepareFailed) as refused:
        a.prepare_now()
    assert "'a'" in str(refused.value) and tx.gtrid in str(refused.value)
    assert isinstance(refused.value.__cause__, psycopg.errors.NotNullViolation)
    tx.branch("b").defer(INSERT, (tx.gtrid, 3))
    assert tx.commit() is Outcome.ABORTED
    assert "'a'" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_branch_prepared_early_takes_no_more_work_and_rolls_back(
    coordinator: Any, settings: Settings
) -> None:
    """After prepare_now(), execute, defer, flush and a second prepare_now() on A raise
    InvalidTransition naming 'a' and the gtrid; a rollback then rolls A's prepared branch
    back (ROLLBACK PREPARED): nothing committed, nothing prepared."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(INSERT, (tx.gtrid, 1))
    a.prepare_now()
    for step in (
        lambda: a.execute(INSERT, (tx.gtrid, 2)),
        lambda: a.defer(INSERT, (tx.gtrid, 3)),
        a.flush,
        a.prepare_now,
    ):
        with pytest.raises(InvalidTransition, match="'a'") as refused:
            step()
        assert tx.gtrid in str(refused.value) and "prepare_now" in str(refused.value)
    tx.execute("b", INSERT, (tx.gtrid, 4))
    assert tx.rollback() is Outcome.ABORTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_the_only_writer_prepared_early_commits(coordinator: Any, settings: Settings) -> None:
    """A alone, prepared early: its one-phase commit is its COMMIT PREPARED; the row is
    there and nothing stays prepared."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(INSERT, (tx.gtrid, 1))
    a.prepare_now()
    assert tx.commit() is Outcome.COMMITTED
    assert count(settings.pg_a, tx.gtrid) == 1
    assert_nothing_prepared(settings, tx.gtrid)


# -- a branch whose work is ended (end_work): prepared now or at phase 1 ----------------


@pytest.mark.lab
def test_ending_the_work_alone_leaves_the_prepare_to_phase_1(
    coordinator: Any, settings: Settings
) -> None:
    """With no other transaction in flight, end_work('a') sends A's work and reads its answer
    but leaves A's PREPARE to phase 1 (nothing prepared before the commit; its DEBUG event
    says prepare_now False); A and B then commit and nothing stays prepared."""
    configure_logging("DEBUG")  # per-step events pass: the transaction asks at its begin
    try:
        with capture_logs() as logs:
            tx = coordinator.begin()
            tx.branch("a").defer(INSERT, (tx.gtrid, 1))
            tx.end_work("a")
    finally:
        configure_logging()
    ended = [e for e in logs if e["event"] == events.WORK_ENDED]
    assert [(e["participant"], e["prepare_now"]) for e in ended] == [("a", False)]
    assert_nothing_prepared(settings, tx.gtrid)
    tx.branch("b").defer(INSERT, (tx.gtrid, 2))
    assert tx.commit() is Outcome.COMMITTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 1)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_ending_the_work_beside_other_transactions_prepares_now(
    coordinator: Any, settings: Settings
) -> None:
    """With another transaction in flight on the coordinator, end_work('a') prepares A at
    once (its gid is in the server before the commit; its DEBUG event says prepare_now
    True); both transactions then commit and nothing stays prepared."""
    configure_logging("DEBUG")
    try:
        with capture_logs() as logs:
            other = coordinator.begin()
            tx = coordinator.begin()
            tx.branch("a").defer(INSERT, (tx.gtrid, 1))
            tx.end_work("a")
    finally:
        configure_logging()
    ended = [e for e in logs if e["event"] == events.WORK_ENDED]
    assert [(e["participant"], e["prepare_now"]) for e in ended] == [("a", True)]
    assert tx.gtrid in {gtrid_of_gid(g) for g in prepared_gids(settings.pg_a)}
    tx.branch("b").defer(INSERT, (tx.gtrid, 2))
    other.execute("b", INSERT, (other.gtrid, 3))
    assert tx.commit() is Outcome.COMMITTED
    assert other.commit() is Outcome.COMMITTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 1)
    assert count(settings.pg_b, other.gtrid) == 1
    assert_nothing_prepared(settings, tx.gtrid, other.gtrid)


@pytest.mark.lab
@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-another"])
def test_a_failure_at_end_work_raises_a_no_vote_and_takes_no_more_work(
    coordinator: Any, settings: Settings, others: int
) -> None:
    """A deferred statement that fails at end_work('a') raises PrepareFailed naming 'a' and
    the gtrid, the server's error as its cause, whether A was to prepare now or at phase 1;
    later work on A raises InvalidTransition naming 'a', the gtrid and end_work; the
    transaction aborts with nothing committed or prepared."""
    beside = [coordinator.begin() for _ in range(others)]
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(INSERT, (tx.gtrid, 1))
    a.defer(FAILING, (2,))
    with pytest.raises(PrepareFailed) as refused:
        tx.end_work("a")
    assert "'a'" in str(refused.value) and tx.gtrid in str(refused.value)
    assert isinstance(refused.value.__cause__, psycopg.errors.NotNullViolation)
    for step in (lambda: a.defer(INSERT, (tx.gtrid, 3)), a.flush, lambda: tx.end_work("a")):
        with pytest.raises(InvalidTransition, match="'a'") as again:
            step()
        assert tx.gtrid in str(again.value) and "end_work" in str(again.value)
    tx.branch("b").defer(INSERT, (tx.gtrid, 4))
    assert tx.commit() is Outcome.ABORTED
    assert "'a'" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)
    for other in beside:
        assert other.rollback() is Outcome.ABORTED


@pytest.mark.lab
@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-another"])
def test_work_that_failed_before_end_work_raises_there(
    coordinator: Any, settings: Settings, others: int
) -> None:
    """An execute on A that failed (its error caught by the caller) makes end_work('a') raise
    PrepareFailed naming 'a' and the gtrid, the server's error as its cause, whether A was to
    prepare now or at phase 1; the transaction aborts with nothing committed or prepared."""
    beside = [coordinator.begin() for _ in range(others)]
    tx = coordinator.begin()
    tx.execute("b", INSERT, (tx.gtrid, 1))
    with pytest.raises(psycopg.errors.NotNullViolation):
        tx.execute("a", FAILING, (2,))
    with pytest.raises(PrepareFailed) as refused:
        tx.end_work("a")
    assert "'a'" in str(refused.value) and tx.gtrid in str(refused.value)
    assert isinstance(refused.value.__cause__, psycopg.errors.NotNullViolation)
    assert tx.commit() is Outcome.ABORTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)
    for other in beside:
        assert other.rollback() is Outcome.ABORTED
