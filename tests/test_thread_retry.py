"""thread-sync's asynchronous retry on the real lab: backoff, dead letters, and a SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest

from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.crash_plan import CRASH_SETTING
from scenarios.strategies.thread import ThreadSyncStrategy
from scenarios.strategies.thread_retry import RetryPolicy
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.transfer.invariants import gather_evidence
from tests.test_outbox import ACCOUNTS, fresh

pytestmark = pytest.mark.lab


def retries(settings: Settings) -> dict[str, tuple[str, int, str]]:
    """transfer id -> (status, attempts, last error) of A's credit_retries."""
    with psycopg.connect(settings.pg_a) as conn:
        rows = conn.execute(
            "SELECT transfer_id, status, attempts, last_error FROM credit_retries"
        ).fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def test_work_that_keeps_failing_ends_as_a_visible_dead_letter(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every retry fails: after the last attempt each row is 'dead' in A with its last error."""
    monkeypatch.delenv(CRASH_SETTING, raising=False)
    fresh(settings)
    strategy = ThreadSyncStrategy()
    strategy.retry_policy = RetryPolicy(max_attempts=3, first_delay=0.01, max_delay=0.05)
    strategy.prepare(settings, concurrency=4)
    strategy.arm_crash("credit-fails", every=5)
    strategy.arm_crash("retry-fails", every=1)
    transfers = scenario.plan(50, accounts=ACCOUNTS, seed=11)
    try:
        result = run_batch(transfers, strategy.run_one, concurrency=4)
        strategy.drain(60)
        stats = strategy.stats()
    finally:
        strategy.close()
    assert result.outcomes[Outcome.IN_DOUBT.value] == 10
    assert (stats["retry_failures"], stats["dead_letters"], stats["retried"]) == (10, 10, 0)
    dead = retries(settings)
    assert len(dead) == 10
    assert all(status == "dead" and attempts == 3 for status, attempts, _ in dead.values())
    assert all("retry of" in error and "injected" in error for _, _, error in dead.values())
    evidence = gather_evidence(settings)
    assert set(evidence.atomicity_violations) == set(dead)  # left for a person, and recorded


def test_retries_left_by_a_killed_process_are_run_by_the_next(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL with retries pending: each lost credit has a pending row; a later process runs it."""
    monkeypatch.delenv(CRASH_SETTING, raising=False)
    fresh(settings)
    env = {
        **os.environ,
        **settings.as_env(),
        CRASH_SETTING: "credit-fails=abandon@3,retry-fails=abandon@1,retry-scheduled=kill@4",
    }
    command = [
        sys.executable, "-m", "scenarios.cli", "transfer", "--strategy", "thread-sync",
        "--count", "30", "--concurrency", "1", "--accounts", str(ACCOUNTS), "--no-check",
    ]  # fmt: skip
    child = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    evidence = gather_evidence(settings)
    lost = evidence.in_a - evidence.in_b
    pending = {tid for tid, (status, _, _) in retries(settings).items() if status == "pending"}
    assert len(lost) == 4
    assert pending == lost  # nothing lost silently: every missing credit has its retry in A

    env.pop(CRASH_SETTING)
    later = subprocess.run(
        [sys.executable, "-m", "scenarios.cli", "retries", "--json"],
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    report = json.loads(later.stdout)
    assert (report["resumed"], report["retried_now"]) == (4, 4)
    assert report["counts"] == {"pending": 0, "done": 4, "dead": 0}
    assert report["not_done"] == []
    evidence = gather_evidence(settings)
    assert evidence.in_a == evidence.in_b
    assert evidence.ok
