"""The batch job and the thread-pool strategies on the real lab.

The batch job: A read as a read-only role, a position safe under writers that
commit out of order, a SIGKILL between reading and committing, a re-run over a
range already copied. The thread pool: errors that never reach the caller, and
work lost with the process; the synchronous remedy reports them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import psycopg
import pytest
from psycopg import errors as pg_errors

from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.crash_plan import CRASH_SETTING
from scenarios.outbox.batchjob import (
    BATCH_CRASH_SETTING,
    BatchConfig,
    BatchJob,
    position,
    reader_dsn,
)
from scenarios.outbox.pipeline import Pipeline
from scenarios.outbox.relay import RelayConfig
from scenarios.strategies.batch import BatchStrategy
from scenarios.strategies.thread import ThreadStrategy, ThreadSyncStrategy
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.transfer.invariants import gather_evidence
from tests.test_outbox import (
    ACCOUNTS,
    all_ids,
    fresh,
    jitter_before_commit,
    naive_cursor,
    run_writers,
    wait_for,
)

pytestmark = pytest.mark.lab


def assert_copied_once(settings: Settings, count: int) -> None:
    """B holds every transfer of A once, each with an applied inbox row; money conserved."""
    evidence = gather_evidence(settings, inbox=True)
    assert len(evidence.in_a) == count
    assert evidence.in_a == evidence.in_b
    assert evidence.inbox is not None
    assert set(evidence.inbox) == evidence.in_a
    assert all(outcome == "applied" for outcome, _ in evidence.inbox.values())
    assert evidence.money_conserved
    assert evidence.ok


def batch_once(settings: Settings, *, chunk: int = 20, crash: str = "") -> int:
    """Run 'python -m scenarios.cli batch --once' as a child; its exit status."""
    env = {**os.environ, **settings.as_env()}
    env.pop(BATCH_CRASH_SETTING, None)
    if crash:
        env[BATCH_CRASH_SETTING] = crash
    command = [sys.executable, "-m", "scenarios.cli", "batch", "--once", "--chunk", str(chunk)]
    done = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
    return done.returncode


def test_batch_reader_cannot_write_to_a(settings: Settings) -> None:
    """The job's role on A reads batch_export; writes nothing, even READ WRITE."""
    fresh(settings)
    with psycopg.connect(reader_dsn(settings)) as conn:
        conn.execute("SELECT count(*) FROM batch_export").fetchone()
        conn.rollback()
        with pytest.raises(pg_errors.ReadOnlySqlTransaction):
            conn.execute(
                "INSERT INTO batch_export (transfer_id, target, amount) VALUES ('x', 'y', 1)"
            )
        conn.rollback()
        conn.execute("BEGIN READ WRITE")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("UPDATE accounts SET balance = 0")
        conn.rollback()
        conn.execute("BEGIN READ WRITE")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            conn.execute("DELETE FROM batch_export")
        conn.rollback()


def test_sixteen_out_of_order_writers_each_copied_once(settings: Settings) -> None:
    """16 writers commit out of id order; the batch job copies all, a plain last-id cursor skips."""
    fresh(settings)
    strategy = BatchStrategy(before_commit=jitter_before_commit)
    stop, seen = threading.Event(), set[int]()
    trap = threading.Thread(target=naive_cursor, args=(settings, "batch_export", stop, seen))
    config = RelayConfig(batch_size=20, poll_interval=0.2)
    with Pipeline(settings, "batch", config=config) as pipeline:
        trap.start()
        result = run_writers(settings, strategy, 320)
        stop.set()
        trap.join()
        assert result.outcomes["committed"] == 320
        wait_for(lambda: position(settings)[2] == 320, 60, "the job to copy all 320")
        assert all(pipeline.alive())
    assert_copied_once(settings, 320)
    skipped = all_ids(settings, "batch_export") - seen
    assert skipped, "the writers did not commit out of id order; the test proves nothing"


def test_batch_killed_between_read_and_commit_is_rerun_without_loss(settings: Settings) -> None:
    """SIGKILL after reading its second chunk: B keeps the first; a re-run copies the rest once."""
    fresh(settings)
    run_writers(settings, BatchStrategy(), 100, concurrency=8)
    assert batch_once(settings, crash="after-read=kill@2") == -9
    assert position(settings)[2] == 20, "only the first chunk's commit survives the kill"
    assert batch_once(settings, crash="before-commit=kill@1") == -9
    assert position(settings)[2] == 20, "credits written but not committed are gone"
    assert batch_once(settings) == 0
    assert position(settings)[2] == 100
    assert_copied_once(settings, 100)


def test_rerun_over_a_copied_range_credits_nothing_twice(settings: Settings) -> None:
    """With the position set back to the start, a run finds every inbox row and credits none."""
    fresh(settings)
    run_writers(settings, BatchStrategy(), 60, concurrency=8)
    job = BatchJob(settings, BatchConfig(chunk=25))
    try:
        assert job.run_once() == 60
        with psycopg.connect(settings.pg_b) as conn:
            conn.execute("UPDATE batch_positions SET last_txid = '0', last_id = 0")
        assert job.run_once() == 60
    finally:
        job.close()
    assert job.stats.copied == 60
    assert job.stats.duplicates == 60
    assert_copied_once(settings, 60)


def test_pool_errors_never_reach_the_caller(settings: Settings) -> None:
    """Every 5th credit fails in the pool: the caller still got 'committed'; A and B disagree."""
    fresh(settings)
    strategy = ThreadStrategy()
    strategy.prepare(settings, concurrency=4)
    strategy.arm_crash("credit-fails", every=5)
    transfers = scenario.plan(50, accounts=ACCOUNTS, seed=7)
    try:
        result = run_batch(transfers, strategy.run_one, concurrency=4)
    finally:
        strategy.close()
    assert result.outcomes["committed"] == 50, "no failure reached a caller"
    assert strategy.stats()["unseen_errors"] == 10
    evidence = gather_evidence(settings)
    assert len(evidence.atomicity_violations) == 10
    assert set(evidence.atomicity_violations) == evidence.in_a - evidence.in_b
    assert not evidence.money_conserved


def test_thread_sync_reports_the_same_failures_as_outcomes(settings: Settings) -> None:
    """The remedy: each failed credit is the caller's IN_DOUBT outcome, then retried until done."""
    fresh(settings)
    strategy = ThreadSyncStrategy()
    strategy.prepare(settings, concurrency=4)
    strategy.arm_crash("credit-fails", every=5)
    transfers = scenario.plan(50, accounts=ACCOUNTS, seed=7)
    try:
        result = run_batch(transfers, strategy.run_one, concurrency=4)
        strategy.drain(60)
        stats = strategy.stats()
    finally:
        strategy.close()
    assert result.outcomes["committed"] == 40
    assert result.outcomes[Outcome.IN_DOUBT.value] == 10
    assert all("CreditFailed" in reason for reason in result.reasons)
    assert (stats["retries_scheduled"], stats["retried"], stats["dead_letters"]) == (10, 10, 0)
    evidence = gather_evidence(settings)
    assert evidence.atomicity_violations == []  # the retries did the work the callers saw fail
    assert evidence.ok


def test_process_killed_with_work_queued_loses_it(settings: Settings) -> None:
    """SIGKILL of 'twopc transfer --strategy thread' with work queued: credits and messages lost."""
    fresh(settings)
    env = {**os.environ, **settings.as_env(), CRASH_SETTING: "process-dies-with-queue=kill@20"}
    command = [
        sys.executable, "-m", "scenarios.cli", "transfer", "--strategy", "thread",
        "--count", "200", "--concurrency", "8", "--accounts", str(ACCOUNTS), "--no-check",
    ]  # fmt: skip
    child = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
    assert child.returncode == -9
    evidence = gather_evidence(settings)
    lost = evidence.in_a - evidence.in_b
    assert lost, "nothing was queued when the process died"
    assert set(evidence.atomicity_violations) >= lost
    assert not evidence.money_conserved


def test_thread_transfer_command_checks_the_invariants(settings: Settings) -> None:
    """'twopc transfer --strategy thread' waits for its pool; every transfer converged."""
    fresh(settings)
    env = {**os.environ, **settings.as_env()}
    env.pop(CRASH_SETTING, None)
    command = [
        sys.executable, "-m", "scenarios.cli", "transfer", "--strategy", "thread",
        "--count", "40", "--accounts", str(ACCOUNTS), "--json",
    ]  # fmt: skip
    child = subprocess.run(command, env=env, capture_output=True, timeout=120, check=True)
    output = json.loads(child.stdout)
    assert output["committed"] == 40
    assert output["unseen_errors"] == 0
    assert output["invariants"]["ok"]
    assert output["convergence_ms"]
