"""Poison messages on the real lab: the consumer survives them, dead-letters them, and goes on.

Covers the reproduction of a 2PC run followed by an outbox run on one lab, a
batch mixing good and bad messages, transient failures retried then given
up, the atomic move to ``/queue/DLQ.<name>`` (ACK and SEND in one STOMP
transaction), ``twopc outbox failed`` and ``twopc outbox requeue``, threads
that stop on an error, and one lab that every strategy and stray messages
pass through.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors

from coordinator.states import Outcome
from participants.stomp_client import Message
from scenarios.config import Settings
from scenarios.outbox import consumer as consumer_module
from scenarios.outbox.consumer import Consumer, inbox_counts
from scenarios.outbox.deadletter import (
    ATTEMPTS_HEADER,
    DESTINATION_HEADER,
    REASON_HEADER,
    Rejection,
    dead_letter,
    dead_letter_queue,
    list_dead_letters,
)
from scenarios.outbox.pipeline import Pipeline, WorkerFailed
from scenarios.strategies import run_transfers
from scenarios.transfer import invariants
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.transfer.destinations import LEDGER_QUEUE
from scenarios.transfer.invariants import gather_evidence
from scenarios.transfer.model import CREDIT_COMMAND, TRANSFER_COMPLETED, TYPE_HEADER
from scenarios.transfer.results import BatchFailed
from tests.broker_queues import fresh_queue
from tests.conftest import open_stomp_client
from tests.test_outbox import ACCOUNTS, fresh, wait_for


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m scenarios.cli ARGS`` against the lab."""
    return subprocess.run(
        [sys.executable, "-m", "scenarios.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ.copy(),
    )


def credit(tid: str, target: str = "acc-00001", amount: int = 5) -> tuple[str, dict[str, str]]:
    """The body and headers of a well-formed credit command."""
    body = scenario.Transfer(tid, "acc-00000", target, amount).body()
    return body, {"transfer-id": tid, TYPE_HEADER: CREDIT_COMMAND}


def put(
    settings: Settings, destination: str, messages: Sequence[tuple[str, dict[str, str]]]
) -> None:
    """Store ``messages`` (body, headers) on ``destination``."""
    with open_stomp_client(settings.stomp) as client:
        for body, headers in messages:
            client.send(destination, body, headers, receipt_timeout=5)


def browse(settings: Settings, destination: str) -> list[Message]:
    with open_stomp_client(settings.stomp) as client:
        return [m for m in client.browse(destination) if not m.is_sentinel]


@pytest.fixture
def private_queue(settings: Settings) -> Iterator[str]:
    """A queue of this test alone, and its dead letters dropped afterwards."""
    name = fresh_queue()
    yield name
    scenario.drain(settings, name, dead_letter_queue(name))


class Running:
    """A consumer on a thread, stopped by the context manager."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.stop = threading.Event()
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.consumer.run(self.stop)
        except BaseException as exc:
            self.error.append(exc)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)


# -- the reproduction ----------------------------------------------------------------------


@pytest.mark.lab
def test_2pc_announcements_then_an_outbox_run_every_invariant_holds(settings: Settings) -> None:
    """2PC's 50 events stay on the ledger's queue of the events' topic, untouched; the outbox
    run after them converges."""
    assert cli("transfer", "--reset", "--accounts", "100", "--count", "0").returncode == 0
    first = cli("transfer", "--count", "50", "--seed", "3")
    assert first.returncode == 0, first.stderr
    second = cli("transfer", "--strategy", "outbox-status", "--count", "200", "--json")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    found = json.loads(second.stdout)["invariants"]
    assert found["ok"] and found["atomicity_violations"] == 0
    assert found["inbox_rows"] == 200 and found["dead_lettered"] == 0
    events = browse(settings, LEDGER_QUEUE)
    assert len(events) == 50
    assert {m.headers[TYPE_HEADER] for m in events} == {TRANSFER_COMPLETED}
    assert browse(settings, dead_letter_queue(scenario.CREDIT_QUEUE)) == []


# -- poison in a batch ---------------------------------------------------------------------


@pytest.mark.lab
def test_poison_messages_are_dead_lettered_and_the_good_ones_in_their_batch_applied(
    settings: Settings, private_queue: str
) -> None:
    """Every kind of bad message goes to the DLQ with its reason; the good ones are credited."""
    fresh(settings)
    with psycopg.connect(settings.pg_b, autocommit=True) as conn:  # B already holds "taken"
        conn.execute("INSERT INTO transfers (transfer_id, amount) VALUES ('taken', 5)")
    good = [credit(f"good-{i}", f"acc-{i:05d}", 10 + i) for i in range(4)]
    bad: dict[str, tuple[tuple[str, dict[str, str]], str]] = {
        "malformed": (
            ("{not json", {"transfer-id": "malformed", TYPE_HEADER: CREDIT_COMMAND}),
            "malformed body",
        ),
        "no-type": ((credit("no-type")[0], {"transfer-id": "no-type"}), "no type header"),
        "event": (
            (credit("event")[0], {"transfer-id": "event", TYPE_HEADER: TRANSFER_COMPLETED}),
            "is an event",
        ),
        "unknown": (
            (credit("unknown")[0], {"transfer-id": "unknown", TYPE_HEADER: "refund"}),
            "unknown type 'refund'",
        ),
        "no-id": ((credit("no-id")[0], {TYPE_HEADER: CREDIT_COMMAND}), "no transfer-id header"),
        "ghost": (credit("ghost", "acc-99999"), "account acc-99999 does not exist in database b"),
        "negative": (credit("negative", amount=-3), "amount must be > 0"),
        "fraction": (
            (credit("fraction")[0].replace('"amount":5', '"amount":2.5'), credit("fraction")[1]),
            "amount must be an integer",
        ),
        "huge": (
            (
                credit("huge")[0].replace('"amount":5', '"amount":99999999999999999999'),
                credit("huge")[1],
            ),
            "invalid for B",
        ),
        "taken": (credit("taken"), "violates transfers_pkey in B"),
    }
    messages = [good[0], good[1]] + [m for m, _ in bad.values()] + [good[2], good[3]]
    put(settings, private_queue, messages)
    before = invariants.balance_sum(settings.pg_b)
    consumer = Consumer(settings, destination=private_queue, batch_size=50)
    with Running(consumer):
        wait_for(lambda: consumer.stats.dead_lettered == len(bad), 30, "the dead letters")
        wait_for(lambda: consumer.stats.applied == len(good), 30, "the good credits")
    assert invariants.balance_sum(settings.pg_b) == before + sum(10 + i for i in range(4))
    assert inbox_counts(settings.pg_b)["rows"] == len(good), "a rejected message left a row"
    letters = browse(settings, dead_letter_queue(private_queue))
    reasons = {m.headers.get("transfer-id", "no-id"): m.headers[REASON_HEADER] for m in letters}
    assert sorted(reasons) == sorted(bad)
    for tid, (_, expected) in bad.items():
        assert expected in reasons[tid], (tid, reasons[tid])
    for letter in letters:
        assert letter.headers[DESTINATION_HEADER] == private_queue
        assert letter.headers[ATTEMPTS_HEADER] == "1"
    assert browse(settings, private_queue) == []


@pytest.mark.lab
def test_a_refused_message_is_left_out_and_the_rest_of_its_batch_applied(
    settings: Settings,
) -> None:
    """apply(): the B transaction is redone without the message B refused, which writes nothing."""
    fresh(settings)
    batch = [
        Message({"transfer-id": tid, "message-id": f"m-{tid}"}, body)
        for tid, body in (
            ("ok-1", credit("ok-1", "acc-00002", 4)[0]),
            ("nobody", credit("nobody", "acc-99999")[0]),
            ("ok-2", credit("ok-2", "acc-00003", 6)[0]),
        )
    ]
    before = invariants.balance_sum(settings.pg_b)
    with psycopg.connect(settings.pg_b) as db:
        outcomes = consumer_module.apply(db, batch)
    assert outcomes == [
        "applied",
        "rejected: account acc-99999 does not exist in database b (transfer nobody)",
        "applied",
    ]
    assert invariants.balance_sum(settings.pg_b) == before + 10
    assert set(invariants.transfer_amounts(settings.pg_b)) == {"ok-1", "ok-2"}
    assert inbox_counts(settings.pg_b)["rows"] == 2


@pytest.mark.lab
def test_transient_failures_are_retried_then_only_the_failing_message_is_dead_lettered(
    settings: Settings, private_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serialization failures: retried with backoff; one that never clears goes alone to the DLQ."""
    fresh(settings)
    real_apply = consumer_module.apply
    calls: dict[str, int] = {"flaky": 0}

    def apply(db: psycopg.Connection, batch: Sequence[Message]) -> list[str]:
        ids = {m.headers.get("transfer-id") for m in batch}
        if "stuck" in ids:
            raise pg_errors.SerializationFailure("could not serialize access (test)")
        if "flaky" in ids and calls["flaky"] < 2:
            calls["flaky"] += 1
            raise pg_errors.SerializationFailure("could not serialize access (test)")
        return real_apply(db, batch)

    monkeypatch.setattr(consumer_module, "apply", apply)
    put(settings, private_queue, [credit("flaky"), credit("stuck"), credit("fine")])
    consumer = Consumer(settings, destination=private_queue, max_attempts=3, retry_delay=0.01)
    with Running(consumer):
        wait_for(lambda: consumer.stats.dead_lettered == 1, 30, "the stuck message's dead letter")
        wait_for(lambda: consumer.stats.applied == 2, 30, "the other two credits")
    [letter] = browse(settings, dead_letter_queue(private_queue))
    assert letter.headers["transfer-id"] == "stuck"
    assert letter.headers[ATTEMPTS_HEADER] == "3"
    assert "gave up after 3 attempts: SerializationFailure" in letter.headers[REASON_HEADER]
    assert consumer.stats.retries >= 3


# -- the move itself -----------------------------------------------------------------------


@pytest.mark.lab
def test_dead_letter_move_is_all_or_nothing_on_activemq(
    settings: Settings, private_queue: str
) -> None:
    """ACK and SEND in one STOMP transaction: a drop before COMMIT keeps the original only."""
    put(settings, private_queue, [credit("move-1")])
    dlq = dead_letter_queue(private_queue)
    with open_stomp_client(settings.stomp) as client:
        message = client.subscribe(private_queue, ack="client-individual").get(5)
        assert message is not None
        client.begin("half-move")
        client.request(
            "ACK", {"id": message.ack_id, "transaction": "half-move"}, what="ACK", timeout=5
        )
        client.send(
            dlq, message.body, {"transfer-id": "move-1"}, transaction="half-move", receipt_timeout=5
        )
        client.drop()  # as if the consumer died before its COMMIT
    wait_for(  # once the broker has seen the connection go, the message is back
        lambda: [m.headers["transfer-id"] for m in browse(settings, private_queue)] == ["move-1"],
        10,
        "the original back on its queue",
    )
    assert browse(settings, dlq) == []

    with open_stomp_client(settings.stomp) as client:
        message = client.subscribe(private_queue, ack="client-individual").get(5)
        assert message is not None and message.headers.get("redelivered") == "true"
        dead_letter(client, [Rejection(message, "test reason", 2)], destination=private_queue)
    assert browse(settings, private_queue) == []
    [letter] = browse(settings, dlq)
    assert letter.headers[REASON_HEADER] == "test reason"
    assert letter.headers[ATTEMPTS_HEADER] == "2"
    assert letter.headers[TYPE_HEADER] == CREDIT_COMMAND and letter.body == message.body


@pytest.mark.lab
def test_outbox_failed_lists_and_requeue_sends_back_a_credit_once_its_account_exists(
    settings: Settings,
) -> None:
    """A credit to a missing account is dead-lettered; created, 'outbox requeue --id' applies it."""
    fresh(settings)
    put(
        settings,
        scenario.CREDIT_QUEUE,
        [credit("later", "acc-77777", 9), credit("other", "acc-88888")],
    )
    consumer = Consumer(settings)
    with Running(consumer):
        wait_for(lambda: consumer.stats.dead_lettered == 2, 30, "two dead letters")
        listed = cli("outbox", "failed", "--json")
        assert listed.returncode == 0, listed.stderr
        letters = json.loads(listed.stdout)["dead_letters"]
        assert {d["transfer_id"]: d["reason"] for d in letters} == {
            "later": "account acc-77777 does not exist in database b (transfer later)",
            "other": "account acc-88888 does not exist in database b (transfer other)",
        }
        assert all(d["dead_lettered_at"] and d["attempts"] == 1 for d in letters)
        with psycopg.connect(settings.pg_b, autocommit=True) as conn:
            conn.execute("INSERT INTO accounts (id, balance) VALUES ('acc-77777', 0)")
        requeued = cli("outbox", "requeue", "--id", "later", "--json")
        assert requeued.returncode == 0, requeued.stderr
        assert json.loads(requeued.stdout)["requeued"] == ["later"]
        wait_for(lambda: consumer.stats.applied == 1, 30, "the requeued credit")
        missing = cli("outbox", "requeue", "--id", "nothing-like-it")
        assert missing.returncode == 1 and "nothing-like-it" in missing.stdout
    with psycopg.connect(settings.pg_b) as conn:
        row = conn.execute("SELECT balance FROM accounts WHERE id = 'acc-77777'").fetchone()
    assert row == (9,)
    with open_stomp_client(settings.stomp) as client:
        letters = list_dead_letters(client, scenario.CREDIT_QUEUE)
        assert [d.transfer_id for d in letters] == ["other"]


# -- threads that stop ---------------------------------------------------------------------


@pytest.mark.lab
def test_a_consumer_that_cannot_go_on_stops_the_transfer_command_with_one_line(
    settings: Settings,
) -> None:
    """B without its inbox: the consumer thread stops, and 'twopc transfer' says so in one line."""
    fresh(settings)
    try:
        with psycopg.connect(settings.pg_b, autocommit=True) as conn:
            conn.execute("DROP TABLE inbox")
        started = time.monotonic()
        ran = cli("transfer", "--strategy", "outbox-status", "--count", "5", "--accounts", "50")
        assert ran.returncode != 0
        assert "Traceback" not in ran.stderr
        [line] = [x for x in ran.stderr.splitlines() if x.startswith("twopc: error:")]
        assert "consumer-0 stopped" in line and "UndefinedTable" in line
        assert "twopc transfer --reset" in line
        assert time.monotonic() - started < 60, "the command waited for a dead consumer"

        pipeline = Pipeline(settings, "status").start()
        try:
            put(settings, scenario.CREDIT_QUEUE, [credit("no-inbox")])
            wait_for(lambda: bool(pipeline.failures()), 30, "the consumer's failure")
            with pytest.raises(WorkerFailed, match="consumer-0 stopped: ConsumerFailed"):
                pipeline.check()
            # The error is kept just before the thread returns: wait for its end.
            wait_for(lambda: not pipeline.alive()[0], 10, "the consumer thread's end")
            with pytest.raises(WorkerFailed, match="UndefinedTable"):
                pipeline.stop()
        finally:
            with contextlib.suppress(WorkerFailed):
                pipeline.stop()  # the relay too: a relay left running takes later tests' rows
    finally:
        fresh(settings)


def test_a_transfer_that_raises_stops_the_batch_and_is_named() -> None:
    """run_batch re-raises a worker's exception in the caller as BatchFailed naming the transfer."""
    transfers = scenario.plan(40, accounts=10, seed=1, run_id="r")

    def run_one(t: scenario.Transfer) -> tuple[Outcome, str]:
        if t.transfer_id == "r-000007":
            raise RuntimeError("bug in the strategy")
        return Outcome.COMMITTED, ""

    with pytest.raises(BatchFailed, match="transfer r-000007 raised RuntimeError: bug"):
        run_batch(transfers, run_one, concurrency=4)


# -- one lab, every strategy ---------------------------------------------------------------


@pytest.mark.lab
def test_every_strategy_and_stray_messages_on_one_lab_every_invariant_holds(
    settings: Settings,
) -> None:
    """2PC, each outbox, CDC and strays on one lab: invariants hold, only strays dead-lettered."""
    fresh(settings)
    outputs: list[dict[str, Any]] = []

    def run(name: str, count: int, seed: int) -> None:
        transfers = scenario.plan(count, accounts=ACCOUNTS, seed=seed)
        outputs.append(run_transfers(settings, name, transfers, concurrency=4, converge_timeout=30))

    run("2pc", 15, 1)
    strays = [
        ("{broken", {"transfer-id": "stray-body", TYPE_HEADER: CREDIT_COMMAND}),
        (credit("stray-type")[0], {"transfer-id": "stray-type"}),
        (credit("stray-kind")[0], {"transfer-id": "stray-kind", TYPE_HEADER: "hello"}),
        credit("stray-account", "acc-55555"),
        ("", {"transfer-id": "stray-empty", TYPE_HEADER: CREDIT_COMMAND}),
    ]
    put(settings, scenario.CREDIT_QUEUE, strays)
    run("outbox-status", 15, 2)
    put(settings, scenario.CREDIT_QUEUE, [credit("stray-late", "acc-55556")])
    run("outbox-last-id", 15, 3)
    run("cdc", 15, 4)
    for output in outputs:
        assert output["invariants"]["ok"], output
        assert output.get("not_converged", 0) == 0, output
    evidence = gather_evidence(settings, inbox=True)
    assert evidence.ok and evidence.atomicity_violations == [] and evidence.money_conserved
    assert len(evidence.in_a) == len(evidence.in_b) == 60 - sum(o["aborted"] for o in outputs)
    assert sum(evidence.on_queue.values()) == 0
    with open_stomp_client(settings.stomp) as client:
        letters = list_dead_letters(client, scenario.CREDIT_QUEUE)
    stray_ids = {
        "stray-body",
        "stray-type",
        "stray-kind",
        "stray-account",
        "stray-empty",
        "stray-late",
    }
    assert stray_ids <= {d.transfer_id for d in letters}
    assert {d.transfer_id for d in letters} == stray_ids  # 2PC's events are not on this queue
    # 2PC's events are on the ledger's queue of the events' topic: one per transfer committed
    assert len(evidence.announced) == 15 - outputs[0]["aborted"]
    assert evidence.dead_letters == len(letters) == len(stray_ids)
