"""SIGTERM and SIGINT stop a long-running twopc command cleanly: in-flight work finishes, the
summary prints, the exit status says it was stopped (128 + the signal), nothing stays prepared;
a second signal stops at once.

Each test runs the real CLI in a child process against the lab and signals it once a
condition shows the run under way (sessions waiting on a lock the test holds, rows in A).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from scenarios.config import Settings
from scenarios.lab.services import Lab
from scenarios.transfer.model import CREDIT_QUEUE, drain, recover_and_reset
from tests.cli_process import Running, count_rows, lock_waiters, prepared_left
from tests.test_dead_letters import credit, put

pytestmark = pytest.mark.lab

STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}
CONCURRENCY = 4


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """The lab's settings, a state folder of the test's own, freshly reset tables."""
    recover_and_reset(settings, accounts=100, balance=10_000)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    base = {k: v for k, v in os.environ.items() if k != "TWOPC_LOG_LEVEL"}
    return {**base, **settings.as_env(), "TWOPC_HOME": str(home), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def accounts_locked(settings: Settings) -> Iterator[psycopg.Connection]:
    """A's every account row locked by the test: transfers block on their debit until commit()."""
    with psycopg.connect(settings.pg_a) as conn:
        conn.execute("SELECT 1 FROM accounts FOR UPDATE")
        yield conn
        conn.rollback()


def in_flight(settings: Settings, run: Running) -> None:
    """Wait until CONCURRENCY transfers of ``run`` wait on the test's lock in A."""
    run.wait_for(
        lambda: lock_waiters(settings.pg_a) >= CONCURRENCY, "transfers waiting on the lock"
    )


def told_to_stop(run: Running) -> bool:
    """True once the child said that it finishes the work in hand."""
    return "finishing the work in hand" in run.stderr


@pytest.mark.parametrize(
    ("signum", "api"),
    [
        (signal.SIGTERM, "threads"),
        (signal.SIGINT, "threads"),
        (signal.SIGTERM, "asyncio"),
        (signal.SIGINT, "asyncio"),
    ],
    ids=["SIGTERM", "SIGINT", "SIGTERM asyncio", "SIGINT asyncio"],
)
def test_a_signalled_transfer_finishes_the_transfers_in_hand_and_prints_its_summary(
    settings: Settings,
    env: dict[str, str],
    tmp_path: Path,
    accounts_locked: psycopg.Connection,
    signum: signal.Signals,
    api: str,
) -> None:
    """The transfers in flight commit, no others start, the summary prints, exit 128+signal
    (the threads' transfers, or the asyncio coordinator's tasks)."""
    run = Running(
        env,
        tmp_path,
        "transfer",
        *("--count", "1000", "--concurrency", str(CONCURRENCY), "--api", api),
    )
    in_flight(settings, run)
    run.signal(signum)
    run.wait_for(lambda: told_to_stop(run), "the child's word that it is stopping")
    accounts_locked.rollback()  # the transfers in hand go on
    status = run.finish()
    assert status == STATUS[signum], run.stdout + run.stderr
    assert f"{CONCURRENCY} committed" in run.stdout, run.stdout
    assert f"{1000 - CONCURRENCY} not started" in run.stdout, run.stdout
    assert "invariants all hold" in run.stdout, run.stdout
    assert f"twopc: stopped by {signum.name}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert count_rows(settings.pg_a, "SELECT count(*) FROM transfers") == CONCURRENCY
    assert prepared_left(settings.pg_a, settings.pg_b) == 0


def test_a_second_signal_stops_the_transfer_at_once(
    settings: Settings, env: dict[str, str], tmp_path: Path, accounts_locked: psycopg.Connection
) -> None:
    """A second SIGTERM while transfers are still in hand ends the process at once with 143."""
    run = Running(env, tmp_path, "transfer", "--count", "1000", "--concurrency", str(CONCURRENCY))
    in_flight(settings, run)
    run.signal(signal.SIGTERM)
    run.wait_for(lambda: told_to_stop(run), "the child's word that it is stopping")
    run.signal(signal.SIGTERM)
    status = run.finish(timeout=10)  # the lock is still held: only stopping at once ends it
    accounts_locked.rollback()
    assert status == 143, run.stdout + run.stderr
    assert "stopping at once" in run.stderr, run.stderr
    assert "committed" not in run.stdout, run.stdout
    assert prepared_left(settings.pg_a, settings.pg_b) == 0


def test_a_signalled_outbox_transfer_stops_its_pipeline_and_skips_the_checks(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    """An asynchronous strategy stops without waiting for B; it says so and exits 143."""
    run = Running(
        env,
        tmp_path,
        "transfer",
        "--strategy",
        "outbox-status",
        "--count",
        "100000",
        "--concurrency",
        str(CONCURRENCY),
    )
    run.wait_for(
        lambda: count_rows(settings.pg_a, "SELECT count(*) FROM transfers") >= 50,
        "50 transfers in A",
    )
    run.signal(signal.SIGTERM)
    status = run.finish()
    assert status == 143, run.stdout + run.stderr
    assert "stopped by SIGTERM" in run.stdout, run.stdout
    assert "checks skipped: the run was stopped before B converged" in run.stdout, run.stdout
    assert "twopc: stopped by SIGTERM" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert prepared_left(settings.pg_a, settings.pg_b) == 0


def test_a_signalled_scenario_run_finishes_the_scenario_in_hand_and_stops(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    """'twopc scenario run all' stops after the scenario in hand, says how many ran, exits 143."""
    run = Running(env, tmp_path, "scenario", "run", "all")
    run.wait_for(lambda: "happy" in run.stdout, "the first scenario's verdict")
    run.signal(signal.SIGTERM)
    status = run.finish()
    assert status == 143, run.stdout + run.stderr
    assert "scenarios run" in run.stdout, run.stdout
    assert "twopc: stopped by SIGTERM" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert prepared_left(settings.pg_a, settings.pg_b) == 0


def test_a_signalled_torture_finishes_the_schedule_in_hand_and_prints_its_table(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    """'twopc torture' ends the schedule in hand (with recovery), prints its table, exits 143."""
    results = tmp_path / "results.jsonl"
    run = Running(
        env,
        tmp_path,
        "torture",
        "--no-matrix",
        "--schedules",
        "20",
        "--count",
        "20",
        "--concurrency",
        "2",
        "--accounts",
        "100",
        "--results",
        str(results),
    )
    run.wait_for(lambda: results.exists() and results.read_text().strip() != "", "a schedule")
    run.signal(signal.SIGTERM)
    status = run.finish(timeout=300)
    assert status == 143, run.stdout + run.stderr
    assert "twopc torture" in run.stdout, run.stdout
    assert "twopc: stopped by SIGTERM" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert len(results.read_text().splitlines()) < 20
    assert prepared_left(settings.pg_a, settings.pg_b) == 0


def test_a_signalled_bench_finishes_the_operations_in_hand_and_writes_no_report(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    """'twopc bench --quick' stops once its transfers in hand end: no report, exit 143."""
    out = tmp_path / "report"
    run = Running(env, tmp_path, "bench", "--quick", "--out", str(out))
    run.wait_for(
        lambda: count_rows(settings.pg_a, "SELECT count(*) FROM transfers") >= 20,
        "the benchmark's transfers in A",
    )
    run.signal(signal.SIGTERM)
    status = run.finish()
    assert status == 143, run.stdout + run.stderr
    assert "twopc: stopped by SIGTERM" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert not (out / "report.md").exists()
    assert prepared_left(settings.pg_a, settings.pg_b) == 0


def test_a_signalled_demo_finishes_the_scenario_in_hand_and_prints_its_summary(
    settings: Settings, env: dict[str, str], tmp_path: Path, lab: Lab
) -> None:
    """'twopc demo' stops after the scenario in hand: the summary of those run, no bench, 143."""
    demo_env = {**env, "TWOPC_HOME": str(lab.home)}  # its 'lab up' finds the running lab
    run = Running(demo_env, tmp_path, "demo", "--count", "50")
    run.wait_for(lambda: "happy" in run.stdout, "the first scenario's verdict")
    run.signal(signal.SIGTERM)
    status = run.finish()
    assert status == 143, run.stdout + run.stderr
    assert "summary" in run.stdout and "scenarios run" in run.stdout, run.stdout
    assert "twopc bench" not in run.stdout, run.stdout
    assert "twopc: stopped by SIGTERM" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert prepared_left(settings.pg_a, settings.pg_b) == 0


def test_a_signalled_2pc_consumer_ends_its_transaction_in_hand_and_exits_0(
    settings: Settings, env: dict[str, str], tmp_path: Path
) -> None:
    """'twopc consumer --mode 2pc' keeps its contract: SIGTERM ends it with 0 and its counts."""
    put(settings, CREDIT_QUEUE, [credit(f"sig-{i:04d}", "acc-00001", 1) for i in range(2000)])
    run = Running(env, tmp_path, "consumer", "--mode", "2pc")
    run.wait_for(
        lambda: count_rows(settings.pg_b, "SELECT count(*) FROM transfers") >= 20,
        "credits applied in B",
    )
    run.signal(signal.SIGTERM)
    status = run.finish()
    assert status == 0, run.stdout + run.stderr
    assert "applied" in run.stdout, run.stdout
    assert "Traceback" not in run.stderr, run.stderr
    assert prepared_left(settings.pg_a, settings.pg_b) == 0
    drain(settings, CREDIT_QUEUE)
