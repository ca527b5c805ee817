"""The outbox strategies on the real lab: every transfer reaches B exactly once in effect.

Covers the status and last-id relays under 16 writers that commit out of id
order (and the trap a plain last-id cursor falls into), two relays at once, a
relay and a consumer SIGKILLed and restarted, the broker down with the
failure log and ``twopc outbox retry``, the failure policies, and injected
writer crashes (the naive dual write shows anomalies, the outbox none).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from coordinator.errors import ConfigurationError, ParticipantUnavailable
from coordinator.states import Outcome
from participants.stomp_client import Message
from scenarios.config import Settings
from scenarios.crash_plan import CRASH_SETTING, CrashPlan
from scenarios.lab.probes import process_start_time
from scenarios.outbox.consumer import CONSUMER_CRASH_SETTING, apply, inbox_counts
from scenarios.outbox.failures import (
    Disposition,
    FailurePolicy,
    OutMessage,
    RetrySettings,
    deliver,
    list_failures,
)
from scenarios.outbox.pipeline import Pipeline, convergence_latencies, wait_converged
from scenarios.outbox.relay import RELAY_CRASH_SETTING, RelayConfig
from scenarios.outbox.relay_modes import RelayMode
from scenarios.strategies import STRATEGIES, new_strategy
from scenarios.strategies.base import Strategy
from scenarios.strategies.outbox import OutboxLastIdStrategy, OutboxStatusStrategy
from scenarios.transfer import invariants
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.transfer.invariants import anomalies, gather_evidence
from scenarios.transfer.results import BatchResult
from tests.cli_process import stop_report
from tests.conftest import BrokerControl

ACCOUNTS = 50


# -- helpers shared with test_cdc ---------------------------------------------------------


def fresh(settings: Settings) -> None:
    """Empty tables, balances back, queue drained, no slot."""
    scenario.reset(settings, accounts=ACCOUNTS, balance=10_000)


def jitter_before_commit() -> None:
    """Hold the writer's transaction open 1-20 ms after its outbox id was taken."""
    time.sleep(random.uniform(0.001, 0.02))


def run_writers(
    settings: Settings, strategy: Strategy, count: int, *, concurrency: int = 16
) -> BatchResult:
    """``count`` transfers through ``strategy`` on ``concurrency`` threads."""
    strategy.prepare(settings, concurrency=concurrency)
    try:
        plan = scenario.plan(count, accounts=ACCOUNTS, seed=random.randrange(1 << 30))
        return run_batch(plan, strategy.run_one, concurrency=concurrency)
    finally:
        strategy.close()


def assert_exactly_once(settings: Settings, *, timeout: float = 60.0) -> None:
    """Converged: money conserved, A and B hold the same transfers, each applied once."""
    missing = wait_converged(settings, timeout=timeout)
    assert not missing, f"{len(missing)} transfers never reached B"
    # Redelivered duplicates may still be on their way through the consumer.
    wait_for(
        lambda: not invariants.queued_transfer_ids(settings, scenario.CREDIT_QUEUE),
        timeout,
        "an empty queue",
    )
    evidence = gather_evidence(settings, inbox=True)
    assert evidence.total_now == evidence.total_expected, "money was created or destroyed"
    assert evidence.in_a == evidence.in_b
    assert set(evidence.inbox) == evidence.in_a
    assert all(outcome == "applied" for outcome, _ in evidence.inbox.values())
    assert evidence.atomicity_violations == []
    assert sum(evidence.on_queue.values()) == 0, "messages left unconsumed"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def fast_config(**retry: object) -> RelayConfig:
    return RelayConfig(batch_size=20, poll_interval=0.5, retry=RetrySettings(**retry))  # type: ignore[arg-type]


def naive_cursor(settings: Settings, table: str, stop: threading.Event, seen: set[int]) -> None:
    """The trap: poll ``id > last`` in id order and remember the highest id seen."""
    last = 0
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        while True:
            done = stop.is_set()
            for (row_id,) in conn.execute(
                f"SELECT id FROM {table} WHERE id > %s ORDER BY id", (last,)
            ).fetchall():
                seen.add(row_id)
                last = row_id
            if done:
                return
            time.sleep(0.002)


def all_ids(settings: Settings, table: str) -> set[int]:
    with psycopg.connect(settings.pg_a) as conn:
        return {row[0] for row in conn.execute(f"SELECT id FROM {table}")}


# -- pure ------------------------------------------------------------------------------


def failing_publish(failures: int) -> tuple[Callable[[object], None], list[int]]:
    calls = [0]

    def publish(batch: object) -> None:
        calls[0] += 1
        if calls[0] <= failures:
            raise ParticipantUnavailable("broker down (test)", participant="relay-broker")

    return publish, calls


BATCH = [OutMessage("t-1", "/queue/transfers", "{}")]


def test_retry_policy_retries_until_the_broker_answers() -> None:
    """'retry' keeps trying with backoff past any limit, then reports the batch sent."""
    publish, calls = failing_publish(4)
    retry = RetrySettings(FailurePolicy.RETRY, max_attempts=1, first_delay=0.001)
    assert deliver(publish, BATCH, retry, threading.Event(), source="t")[:2] == (
        Disposition.SENT,
        5,
    )
    assert calls[0] == 5


def test_failure_log_policy_gives_up_after_max_attempts() -> None:
    """'failure-log' stops after max_attempts and hands the batch to the failure log."""
    publish, calls = failing_publish(100)
    retry = RetrySettings(FailurePolicy.FAILURE_LOG, max_attempts=3, first_delay=0.001)
    disposition, attempts, error = deliver(publish, BATCH, retry, threading.Event(), source="t")
    assert (disposition, attempts, calls[0]) == (Disposition.FAILED, 3, 3)
    assert "broker down" in error


def test_ignore_policy_drops_after_one_attempt() -> None:
    """'ignore' makes one attempt and drops the batch."""
    publish, calls = failing_publish(100)
    retry = RetrySettings(FailurePolicy.IGNORE, first_delay=0.001)
    assert deliver(publish, BATCH, retry, threading.Event(), source="t")[0] is Disposition.IGNORED
    assert calls[0] == 1


def test_backoff_doubles_up_to_its_ceiling() -> None:
    """Delays grow by doubling (with jitter in [half, full]) and never pass max_delay."""
    retry = RetrySettings(first_delay=0.1, max_delay=1.0)
    assert 0.05 <= retry.delay(1) <= 0.1
    assert 0.2 <= retry.delay(3) <= 0.4
    assert 0.5 <= retry.delay(10) <= 1.0


def test_policy_setting_is_read_from_the_environment() -> None:
    """TWOPC_OUTBOX_POLICY and friends choose the policy; explicit values win."""
    env = {"TWOPC_OUTBOX_POLICY": "retry", "TWOPC_OUTBOX_MAX_ATTEMPTS": "7"}
    assert RetrySettings.from_env(env).policy is FailurePolicy.RETRY
    assert RetrySettings.from_env(env).max_attempts == 7
    assert RetrySettings.from_env(env, policy="ignore").policy is FailurePolicy.IGNORE


def test_registry_names_match_the_cli_choice() -> None:
    """Every strategy in the registry is offered by 'twopc transfer --strategy'."""
    from scenarios.cli.transfer import transfer

    option = next(p for p in transfer.params if p.name == "strategy")
    assert sorted(option.type.choices) == sorted(STRATEGIES)  # type: ignore[attr-defined]


# -- the real lab -----------------------------------------------------------------------


@pytest.mark.lab
@pytest.mark.parametrize("mode", ["status", "last-id"])
def test_sixteen_out_of_order_writers_each_delivered_once(settings: Settings, mode: str) -> None:
    """16 writers commit out of id order; the relay delivers all, a plain last-id cursor skips."""
    fresh(settings)
    strategy = (OutboxStatusStrategy if mode == "status" else OutboxLastIdStrategy)(
        before_commit=jitter_before_commit
    )
    stop, seen = threading.Event(), set[int]()
    trap = threading.Thread(target=naive_cursor, args=(settings, "outbox", stop, seen))
    with Pipeline(settings, strategy.relay_mode or "status", config=fast_config()):
        trap.start()
        result = run_writers(settings, strategy, 320)
        stop.set()
        trap.join()
        assert result.outcomes["committed"] == 320
        assert_exactly_once(settings)
    skipped = all_ids(settings, "outbox") - seen
    # The trap is real: ids committed after a higher id was seen are never read again.
    assert skipped, "the writers did not commit out of id order; the test proves nothing"
    assert inbox_counts(settings.pg_b)["rows"] == 320


@pytest.mark.lab
@pytest.mark.parametrize("mode", ["status", "last-id"])
def test_two_relays_share_the_outbox_without_sending_twice(settings: Settings, mode: str) -> None:
    """Two relays at once: every transfer delivered, none sent by both."""
    fresh(settings)
    strategy = (OutboxStatusStrategy if mode == "status" else OutboxLastIdStrategy)(
        before_commit=jitter_before_commit
    )
    relay_mode: RelayMode = "status" if mode == "status" else "last-id"
    with Pipeline(settings, relay_mode, relays=2, config=fast_config()) as pipeline:
        run_writers(settings, strategy, 240)
        assert_exactly_once(settings)
        assert all(pipeline.alive())
    assert inbox_counts(settings.pg_b)["duplicates"] == 0


@pytest.mark.lab
@pytest.mark.parametrize("mode", ["status", "last-id"])
def test_relay_killed_after_publishing_is_restarted_without_loss(
    settings: Settings, mode: RelayMode, tmp_path: Path
) -> None:
    """A relay SIGKILLed between publishing and recording restarts; the replay is absorbed."""
    fresh(settings)
    pipeline = Pipeline(
        settings,
        mode,
        processes=True,
        config=fast_config(),
        env={RELAY_CRASH_SETTING: "after-publish=kill@3"},
        log_dir=str(tmp_path),
    ).start()
    try:
        strategy = new_strategy(f"outbox-{mode}")
        run_writers(settings, strategy, 200, concurrency=8)
        relay = pipeline.relay_workers()[0].process
        assert relay is not None
        assert relay.wait(30) == -9, "the relay was to SIGKILL itself after its third batch"
        pipeline.env = {}
        pipeline.restart("relay")
        assert_exactly_once(settings)
    finally:
        codes = pipeline.stop()
    assert codes == [0, 0], "SIGTERM must end the consumer and the relay cleanly: " + stop_report(
        pipeline
    )
    assert inbox_counts(settings.pg_b)["duplicates"] > 0, "the replayed batch never arrived"


@pytest.mark.lab
def test_relay_killed_from_outside_mid_stream_is_restarted(settings: Settings) -> None:
    """SIGKILL of a running 'python -m scenarios.cli relay' while writers write; restart heals."""
    fresh(settings)
    strategy = OutboxLastIdStrategy(before_commit=jitter_before_commit)
    with Pipeline(settings, "last-id", processes=True, config=fast_config()) as pipeline:
        writers = threading.Thread(target=run_writers, args=(settings, strategy, 300))
        writers.start()
        wait_for(lambda: bool(inbox_counts(settings.pg_b)["rows"]), 30, "the first delivery")
        pipeline.kill("relay")
        time.sleep(0.3)
        pipeline.restart("relay")
        writers.join()
        assert_exactly_once(settings)


#: Starts a pipeline of processes, prints its workers' pids, then waits to be killed.
STARTER = """
import sys
from scenarios.config import Settings
from scenarios.outbox.pipeline import Pipeline
pipeline = Pipeline(Settings.load(), "status", processes=True).start()
print(" ".join(str(w.process.pid) for w in pipeline.workers), flush=True)
sys.stdin.readline()
"""


@pytest.mark.lab
def test_a_pipelines_workers_stop_once_the_process_that_started_them_is_killed(
    settings: Settings,
) -> None:
    """SIGKILL of a process running a pipeline of processes: its relay and consumer, told
    its pid (TWOPC_STOP_WITH_PARENT), stop on their own instead of running on unowned."""
    pids: list[int] = []
    with subprocess.Popen(
        [sys.executable, "-c", STARTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **settings.as_env()},
        cwd=Path(__file__).resolve().parent.parent,
    ) as starter:
        assert starter.stdout is not None
        pids = [int(pid) for pid in starter.stdout.readline().split()]
        try:
            assert len(pids) == 2, pids  # the consumer, the relay
            for pid in pids:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                assert f"TWOPC_STOP_WITH_PARENT={starter.pid}".encode() in environ, pid
            time.sleep(1.0)  # both up and working
            assert all(process_start_time(pid) is not None for pid in pids), pids
            starter.kill()
            starter.wait(10)
            wait_for(
                lambda: all(process_start_time(pid) is None for pid in pids),
                20,
                "the workers to stop",
            )
        finally:
            starter.kill()
            for pid in pids:
                if process_start_time(pid) is not None:
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.lab
def test_consumer_killed_before_acking_gets_the_batch_again(settings: Settings) -> None:
    """The consumer dies after B's commit and before its ACKs: redelivered, applied once."""
    fresh(settings)
    pipeline = Pipeline(
        settings,
        "status",
        processes=True,
        config=fast_config(),
        # kill@1: the first batch. A consumer that starts after the relay published all
        # 150 (a loaded machine) takes them in one batch, so a second may never come.
        env={CONSUMER_CRASH_SETTING: "after-b-commit=kill@1"},
    ).start()
    try:
        run_writers(settings, OutboxStatusStrategy(), 150, concurrency=8)
        consumer = pipeline.workers[0].process
        assert consumer is not None
        assert consumer.wait(30) == -9
        pipeline.env = {}
        pipeline.restart("consumer")
        assert_exactly_once(settings)
    finally:
        pipeline.stop()
    assert inbox_counts(settings.pg_b)["duplicates"] > 0


@pytest.mark.lab
def test_consumer_applies_a_redelivered_message_once(settings: Settings) -> None:
    """The same transfer-id three times (twice in one batch) credits B once."""
    fresh(settings)
    transfer = scenario.Transfer("dup-1", "acc-00000", "acc-00001", 7)
    message = Message({"transfer-id": "dup-1", "message-id": "m-1", "ack": "a-1"}, transfer.body())
    before = invariants.balance_sum(settings.pg_b)
    with psycopg.connect(settings.pg_b) as db:
        assert apply(db, [message, message]) == ["applied", "duplicate"]
        assert apply(db, [message]) == ["duplicate"]
    assert invariants.balance_sum(settings.pg_b) == before + 7
    assert inbox_counts(settings.pg_b) == {"rows": 1, "duplicates": 2, "rejected": 0}


@pytest.mark.lab
@pytest.mark.parametrize(
    ("mode", "strategy_name"),
    [("status", "outbox-status"), ("last-id", "outbox-last-id"), ("cdc", "cdc")],
)
def test_broker_down_fills_the_failure_log_and_outbox_retry_delivers(
    settings: Settings, broker_control: BrokerControl, mode: RelayMode, strategy_name: str
) -> None:
    """Broker down: retries with backoff, then the failure log; 'twopc outbox retry' sends them."""
    fresh(settings)
    control = broker_control
    control.kill()
    config = fast_config(policy=FailurePolicy.FAILURE_LOG, max_attempts=3, first_delay=0.05)
    with Pipeline(settings, mode, config=config) as pipeline:
        run_writers(settings, new_strategy(strategy_name), 30, concurrency=4)
        wait_for(lambda: len(list_failures(settings.pg_a)) == 30, 30, "the failure log")
        relay = pipeline.relay_workers()[0].runner
        assert relay is not None
        # The relay counts a batch just after it logged its failure: wait for the count.
        wait_for(lambda: relay.stats.failed == 30, 5, "30 failures counted by the relay")  # type: ignore[union-attr]
        listed = subprocess.run(
            [sys.executable, "-m", "scenarios.cli", "outbox", "failed", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert listed.stdout.count('"transfer_id"') == 30
        control.start()
        retried = subprocess.run(
            [sys.executable, "-m", "scenarios.cli", "outbox", "retry", "--json"],
            capture_output=True,
            text=True,
        )
        assert retried.returncode == 0, retried.stderr
        assert '"sent": 30' in retried.stdout
        assert_exactly_once(settings)
    assert list_failures(settings.pg_a) == []
    assert gather_evidence(settings, inbox=True).pending == 0


@pytest.mark.lab
def test_retry_policy_holds_rows_while_the_broker_is_down(
    settings: Settings, broker_control: BrokerControl
) -> None:
    """Policy 'retry': nothing goes to the failure log; rows wait and go once the broker is back."""
    fresh(settings)
    control = broker_control
    control.kill()
    config = fast_config(policy=FailurePolicy.RETRY, first_delay=0.05, max_delay=0.5)
    with Pipeline(settings, "last-id", config=config):
        run_writers(settings, OutboxLastIdStrategy(), 20, concurrency=4)
        time.sleep(1.0)
        assert inbox_counts(settings.pg_b)["rows"] == 0
        control.start()
        assert_exactly_once(settings)
    assert list_failures(settings.pg_a, include_resent=True) == []


@pytest.mark.lab
def test_injected_writer_crashes_break_naive_but_not_the_outbox(settings: Settings) -> None:
    """Writers dying after A's commit: the naive dual write loses B; the outbox converges."""
    fresh(settings)
    naive = new_strategy("naive")
    naive.arm_crash("after-a-commit", every=5)
    result = run_writers(settings, naive, 40, concurrency=4)
    assert result.outcomes[Outcome.IN_DOUBT.value] == 8
    found = anomalies(settings, None)
    assert len(found) == 9 and "money" in found  # 8 transfers, and the money they took

    fresh(settings)
    outbox = new_strategy("outbox-status")
    outbox.arm_crash("after-commit", every=5)
    outbox.arm_crash("before-commit", every=7)
    with Pipeline(settings, "status", config=fast_config()):
        run_writers(settings, outbox, 40, concurrency=4)
        assert_exactly_once(settings)
    assert anomalies(settings, "status") == []
    assert len(convergence_latencies(settings, outbox.committed_at)) == len(outbox.committed_at)


def test_crash_points_are_checked_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Arming an unknown crash point names the known ones; the env form arms kill@n."""
    strategy = new_strategy("naive")
    with pytest.raises(ConfigurationError, match="after-a-commit"):
        strategy.arm_crash("nowhere")
    plan = CrashPlan("naive", ("after-a-commit",))
    monkeypatch.setenv(CRASH_SETTING, "after-a-commit=abandon@2")
    plan.arm_from_env()
    assert [plan.hit("after-a-commit") for _ in range(4)] == [False, True, False, True]


@pytest.mark.lab
def test_2pc_strategy_from_the_registry_commits_atomically(settings: Settings) -> None:
    """The registry's 2pc wraps transfer_2pc: A, B and the queue agree; commit times recorded."""
    fresh(settings)
    strategy = new_strategy("2pc")
    result = run_writers(settings, strategy, 20, concurrency=4)
    assert result.outcomes["committed"] == 20
    assert len(strategy.committed_at) == 20
    assert anomalies(settings, None) == []
