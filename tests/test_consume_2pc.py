"""Consuming inside a global transaction: the ACK in the broker's transaction, the credit in
B's XA branch, and a SIGKILL at every step leaving the message either queued with nothing
applied or consumed with the credit applied once.

Also the two ActiveMQ behaviours the consumer relies on, shown against the real broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from coordinator.compat import aqueue_get
from coordinator.coordinator import Coordinator
from coordinator.failpoints import failpoint_env
from coordinator.log.memory import MemoryDecisionLog
from participants.fake import FakeBroker, FakeResource
from scenarios.config import Settings
from scenarios.outbox.consumer import CONSUMER_CRASH_SETTING
from scenarios.outbox.consumer_2pc import TwoPhaseConsumer
from scenarios.outbox.consumer_2pc_aio import AsyncTwoPhaseConsumer
from scenarios.outbox.deadletter import REASON_HEADER, dead_letter_queue
from scenarios.transfer import model as scenario
from scenarios.transfer.model import CREDIT_QUEUE
from tests.cli_process import all_stopped, stopped
from tests.conftest import open_stomp_client
from tests.test_dead_letters import Running, browse, credit, private_queue, put
from tests.test_outbox import fresh, wait_for

__all__ = ["private_queue"]  # the fixture, imported for this module's tests


def b_state(settings: Settings) -> tuple[dict[str, int], list[str], int]:
    """B's balances, the transfer ids it holds, and its prepared transactions."""
    with psycopg.connect(settings.pg_b) as conn:
        balances = dict(conn.execute("SELECT id, balance FROM accounts").fetchall())
        ids = [r[0] for r in conn.execute("SELECT transfer_id FROM transfers ORDER BY 1")]
        prepared = conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()
    return balances, ids, int(prepared[0]) if prepared else 0


@pytest.fixture
def clean(settings: Settings) -> Iterator[None]:
    """A fresh lab; the credit queue and its dead letters drained afterwards."""
    fresh(settings)
    yield
    scenario.drain(settings, CREDIT_QUEUE)
    scenario.drain(settings, dead_letter_queue(CREDIT_QUEUE))


# -- the broker's behaviour ------------------------------------------------------------


@pytest.mark.lab
def test_activemq_an_ack_in_an_aborted_transaction_leaves_the_message_unconsumed(
    settings: Settings, private_queue: str
) -> None:
    """ACK then ABORT: the message stays delivered to the connection, and returns when it closes."""
    put(settings, private_queue, [credit("abort-1")])
    with open_stomp_client(settings.stomp) as client:
        subscription = client.subscribe(private_queue, ack="client-individual", prefetch=1)
        message = subscription.get(5)
        assert message is not None
        client.begin("acked-then-aborted")
        client.request(
            "ACK", {"id": message.ack_id, "transaction": "acked-then-aborted"}, what="ACK"
        )
        client.abort("acked-then-aborted", 5)
        assert subscription.get(1) is None  # not redelivered on this connection
    wait_for(
        lambda: [m.headers["transfer-id"] for m in browse(settings, private_queue)] == ["abort-1"],
        10,
        "the message back on its queue once the connection closed",
    )
    with open_stomp_client(settings.stomp) as client:
        again = client.subscribe(private_queue, ack="client-individual").get(5)
        assert again is not None and again.headers.get("redelivered") == "true"
        client.begin("acked-and-committed")
        client.request(
            "ACK", {"id": again.ack_id, "transaction": "acked-and-committed"}, what="ACK"
        )
        client.commit("acked-and-committed", 5)
    assert browse(settings, private_queue) == []


@pytest.mark.lab
def test_activemq_an_unacked_message_returns_to_the_queue_when_its_connection_dies(
    settings: Settings, private_queue: str
) -> None:
    """A message delivered and never acknowledged is redelivered once its connection drops."""
    put(settings, private_queue, [credit("dies-1")])
    client = open_stomp_client(settings.stomp)
    message = client.subscribe(private_queue, ack="client-individual").get(5)
    assert message is not None
    client.drop()  # no DISCONNECT: the socket closes, as when the process is killed
    with open_stomp_client(settings.stomp) as other:
        again = other.subscribe(private_queue, ack="client-individual").get(10)
        assert again is not None
        assert again.headers["transfer-id"] == "dies-1"
        assert again.headers.get("redelivered") == "true"
        other.ack(again, receipt_timeout=5)


# -- the contract on fakes -------------------------------------------------------------


def test_an_ack_is_broker_work_committed_with_the_marker_or_dropped_by_an_abort() -> None:
    """Transaction.ack goes into the broker session: consumed with the commit, not with abort."""
    broker = FakeBroker()
    b = FakeResource("b")
    with Coordinator("t", MemoryDecisionLog(), [b], broker, housekeeping_interval=None) as coord:
        with coord.transaction() as tx:
            tx.execute("b", "credit")
            tx.ack("ack-1")
        assert broker.store.acked == ["ack-1"] and broker.store.markers
        tx = coord.begin()
        tx.execute("b", "credit")
        tx.ack("ack-2")
        tx.rollback()
        assert broker.store.acked == ["ack-1"]


def test_a_queued_message_is_taken_even_when_no_time_is_left_to_wait() -> None:
    """An asyncio subscription's queue hands out a waiting item with a timeout of 0 (the end
    of a batch's --max-wait), which asyncio.wait_for alone never does on Python 3.11."""

    async def take() -> list[int | None]:
        items: asyncio.Queue[int] = asyncio.Queue()
        items.put_nowait(7)
        return [await aqueue_get(items, 0), await aqueue_get(items, 0)]

    assert asyncio.run(take()) == [7, None]


# -- the consumer on the lab -----------------------------------------------------------


@pytest.mark.lab
def test_2pc_consumer_credits_once_absorbs_duplicates_and_dead_letters_poison(
    settings: Settings, clean: None
) -> None:
    """Credits applied once with no inbox row, a duplicate acknowledged, poison dead-lettered."""
    good = [credit(f"x-{i}", f"acc-{i:05d}", 10 + i) for i in range(4)]
    poison = credit("poor", "acc-99999", 5)  # no such account in B
    put(settings, CREDIT_QUEUE, [*good, good[0], poison])
    before, _, _ = b_state(settings)
    consumer = TwoPhaseConsumer(settings)
    with Running(consumer):  # type: ignore[arg-type]
        wait_for(
            lambda: consumer.stats.applied == 4 and consumer.stats.dead_lettered == 1,
            30,
            "four credits and one dead letter",
        )
        wait_for(lambda: consumer.stats.duplicates == 1, 10, "the duplicate absorbed")
    after, ids, prepared = b_state(settings)
    assert ids == [f"x-{i}" for i in range(4)] and prepared == 0
    for i in range(4):
        assert after[f"acc-{i:05d}"] - before[f"acc-{i:05d}"] == 10 + i
    with psycopg.connect(settings.pg_b) as conn:
        assert conn.execute("SELECT count(*) FROM inbox").fetchone() == (0,)
    assert browse(settings, CREDIT_QUEUE) == []
    [letter] = browse(settings, dead_letter_queue(CREDIT_QUEUE))
    assert letter.headers["transfer-id"] == "poor"
    assert "acc-99999" in letter.headers[REASON_HEADER]


CONSUMERS = {"sync": TwoPhaseConsumer, "asyncio": AsyncTwoPhaseConsumer}


@pytest.mark.lab
@pytest.mark.parametrize("api", list(CONSUMERS))
def test_2pc_consumer_applies_a_batch_in_one_global_transaction(
    settings: Settings, clean: None, api: str
) -> None:
    """Messages queued together are credited in one global transaction (one marker, one
    PREPARE on B), on threads and on asyncio."""
    messages = [credit(f"batch-{i}", f"acc-{i:05d}", 3 + i) for i in range(5)]
    put(settings, CREDIT_QUEUE, messages)
    before, _, _ = b_state(settings)
    consumer = CONSUMERS[api](settings, batch_size=5, max_wait=5.0)
    with Running(consumer):  # type: ignore[arg-type]
        wait_for(lambda: consumer.stats.applied == 5, 30, "five credits")
    after, ids, prepared = b_state(settings)
    assert consumer.stats.batches == 1 and consumer.stats.aborted == 0
    assert ids == sorted(f"batch-{i}" for i in range(5)) and prepared == 0
    for i in range(5):
        assert after[f"acc-{i:05d}"] - before[f"acc-{i:05d}"] == 3 + i
    assert browse(settings, CREDIT_QUEUE) == []


@pytest.mark.lab
@pytest.mark.parametrize("api", list(CONSUMERS))
def test_poison_in_a_batch_is_dead_lettered_and_the_rest_of_the_batch_committed(
    settings: Settings, clean: None, api: str
) -> None:
    """A credit to a missing account and one B refuses (bigint overflow, which fails the
    batch's statement) go to the dead-letter queue; the batch's other credits commit once."""
    huge = 2**62
    good = [credit(f"ok-{i}", f"acc-{i:05d}", 10 + i) for i in range(3)]
    poison = [
        credit("huge-1", "acc-00007", huge),  # fits in B's bigint balance
        credit("huge-2", "acc-00007", huge),  # the second one to the same account does not
        credit("poor", "acc-99999", 5),  # no such account in B
    ]
    put(settings, CREDIT_QUEUE, [*good[:2], *poison, good[2]])
    before, _, _ = b_state(settings)
    consumer = CONSUMERS[api](settings, batch_size=6, max_wait=5.0)
    with Running(consumer):  # type: ignore[arg-type]
        wait_for(
            lambda: consumer.stats.applied == 4 and consumer.stats.dead_lettered == 2,
            30,
            "four credits and two dead letters",
        )
    after, ids, prepared = b_state(settings)
    assert ids == ["huge-1", "ok-0", "ok-1", "ok-2"] and prepared == 0
    for i in range(3):
        assert after[f"acc-{i:05d}"] - before[f"acc-{i:05d}"] == 10 + i
    assert after["acc-00007"] - before["acc-00007"] == huge
    assert consumer.stats.aborted == 0 and consumer.stats.reconnects == 0
    assert browse(settings, CREDIT_QUEUE) == []
    letters = {
        m.headers["transfer-id"]: m.headers[REASON_HEADER]
        for m in browse(settings, dead_letter_queue(CREDIT_QUEUE))
    }
    assert sorted(letters) == ["huge-2", "poor"]
    assert "acc-99999" in letters["poor"] and "out of range" in letters["huge-2"]


def run_consumer_cli(
    settings: Settings, env: dict[str, str], api: str = "sync", *options: str
) -> subprocess.Popen[str]:
    """``twopc consumer --mode 2pc`` (``--asyncio`` for that API) as a process of its own."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scenarios.cli",
            "consumer",
            "--mode",
            "2pc",
            *(["--asyncio"] if api == "asyncio" else []),
            *options,
        ],
        env={**os.environ, **settings.as_env(), "TWOPC_LOG_LEVEL": "WARNING", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


CRASHES = {
    "after-receipt": {CONSUMER_CRASH_SETTING: "after-receipt=kill@2", **failpoint_env(None)},
    "after-prepare": failpoint_env("after_prepare=kill@2"),
    "before-broker-commit": failpoint_env("before_broker_commit=kill@2"),
    "after-broker-commit": failpoint_env("after_broker_commit=kill@2"),
    "before-b-commit": failpoint_env("after_decision=kill@2"),
}

#: Batches of three: the six credits queued make two, the second killed mid-way.
BATCHES = ("--batch-size", "3", "--max-wait", "5000")


@pytest.mark.lab
@pytest.mark.parametrize("api", ["sync", "asyncio"])
@pytest.mark.parametrize("point", list(CRASHES))
def test_a_2pc_consumer_killed_at_each_step_applies_every_credit_exactly_once(
    settings: Settings, clean: None, point: str, api: str
) -> None:
    """SIGKILL at the step of a batch's transaction, restart: each credit applied once,
    nothing prepared, nothing lost (the consumer on threads and on asyncio)."""
    count = 6
    messages = [credit(f"k-{i}", f"acc-{i:05d}", 1 + i) for i in range(count)]
    put(settings, CREDIT_QUEUE, messages)
    before, _, _ = b_state(settings)
    crash = {CONSUMER_CRASH_SETTING: "", **CRASHES[point]}
    killed = run_consumer_cli(settings, crash, api, *BATCHES)
    try:
        _, err = killed.communicate(timeout=60)
    finally:
        killed.kill()
    assert killed.returncode == -signal.SIGKILL, err
    _, ids, prepared = b_state(settings)
    assert len(ids) in (3, 6)  # the first batch committed; the second is in flight
    restarted = run_consumer_cli(
        settings, {CONSUMER_CRASH_SETTING: "", **failpoint_env(None)}, api, *BATCHES
    )
    try:
        wait_for(
            lambda: len(b_state(settings)[1]) == count and not browse(settings, CREDIT_QUEUE),
            60,
            "every credit applied and the queue empty",
        )
        time.sleep(0.5)
    finally:
        restarted.send_signal(signal.SIGTERM)
        out, err = stopped(restarted)
    assert restarted.returncode == 0, err
    after, ids, prepared = b_state(settings)
    assert ids == sorted(f"k-{i}" for i in range(count))
    assert prepared == 0
    for i in range(count):
        assert after[f"acc-{i:05d}"] - before[f"acc-{i:05d}"] == 1 + i
    assert browse(settings, dead_letter_queue(CREDIT_QUEUE)) == []
    assert "applied" in out


def twopc_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``twopc ARGS`` run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "scenarios.cli", *args],
        env={**os.environ, **settings.as_env(), **failpoint_env(None)},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.lab
def test_no_pipeline_only_writes_and_its_checks_wait_for_a_separate_2pc_consumer(
    settings: Settings, clean: None
) -> None:
    """--no-pipeline starts no relay nor consumer; with 'consumer --mode 2pc' elsewhere it holds."""
    alone = twopc_cli(
        settings,
        "transfer",
        "--strategy",
        "outbox-status",
        "--count",
        "5",
        "--no-pipeline",
        "--consumer-mode",
        "2pc",
        "--converge-timeout",
        "2",
        "--json",
    )
    assert alone.returncode == 1, alone.stderr
    assert "not credited in B within 2 s" in alone.stderr
    assert "twopc consumer --mode 2pc" in alone.stderr
    with psycopg.connect(settings.pg_a) as conn:  # nothing relayed: still pending
        assert conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone() == (
            5,
        )
    relay = subprocess.Popen(
        [sys.executable, "-m", "scenarios.cli", "relay", "--mode", "status"],
        env={**os.environ, **settings.as_env(), "TWOPC_LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # its stacks, should it not stop (stopped())
    )
    consumer = run_consumer_cli(settings, {CONSUMER_CRASH_SETTING: "", **failpoint_env(None)})
    try:
        together = twopc_cli(
            settings,
            "transfer",
            "--strategy",
            "outbox-status",
            "--count",
            "7",
            "--no-pipeline",
            "--consumer-mode",
            "2pc",
            "--json",
        )
    finally:
        for process in (relay, consumer):
            process.send_signal(signal.SIGTERM)
        all_stopped((relay, consumer))
    assert together.returncode == 0, together.stderr
    out = json.loads(together.stdout)
    assert out["not_converged"] == 0 and out["invariants"]["ok"]
    _, ids, prepared = b_state(settings)
    assert len(ids) == 12 and prepared == 0  # the first five too, once the relay ran
    with psycopg.connect(settings.pg_b) as conn:
        assert conn.execute("SELECT count(*) FROM inbox").fetchone() == (0,)


def test_no_pipeline_error_names_what_each_strategy_needs_started() -> None:
    """The --no-pipeline error names the relay and consumer, the batch job, or the fan-out."""
    from scenarios.strategies import converge_commands, new_strategy

    assert converge_commands(new_strategy("outbox-status"), "2pc") == (
        "'twopc relay --mode status' and 'twopc consumer --mode 2pc'"
    )
    assert converge_commands(new_strategy("batch"), "inbox") == "'twopc batch'"
    fanout = converge_commands(new_strategy("cdc-fanout"), "inbox")
    assert fanout.startswith("'twopc relay --mode cdc', 'twopc consumer --mode inbox' and ")
    assert "'twopc fanout --consumer slow'" in fanout


@pytest.mark.lab
def test_no_pipeline_batch_starts_no_job_and_a_separate_batch_run_converges_it(
    settings: Settings, clean: None
) -> None:
    """--no-pipeline with batch copies nothing, names 'twopc batch', which then credits B."""
    alone = twopc_cli(
        settings,
        "transfer",
        "--strategy",
        "batch",
        "--count",
        "5",
        "--no-pipeline",
        "--converge-timeout",
        "1",
        "--json",
    )
    assert alone.returncode == 1, alone.stderr
    assert "not credited in B within 1 s" in alone.stderr and "'twopc batch'" in alone.stderr
    with psycopg.connect(settings.pg_b) as conn:
        assert conn.execute("SELECT count(*) FROM inbox").fetchone() == (0,)
    job = twopc_cli(settings, "batch", "--once")
    assert job.returncode == 0, job.stderr
    with psycopg.connect(settings.pg_b) as conn:
        assert conn.execute("SELECT count(*) FROM inbox").fetchone() == (5,)
