"""Events and commands on the real lab: the virtual topic, kinds dead-lettered, refusals, and
the event sent before A's transaction ended.

Events ("this happened") go to /topic/VirtualTopic.transfers and reach every
consumer queue of it; commands ("do this") go to the one queue of their one
receiver. A consumer dead-letters the wrong kind for its destination.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest

from participants.stomp_client import Message
from scenarios.bench.crash_anomalies import crash_anomalies
from scenarios.bench.report_plan import ReportPlan
from scenarios.config import Settings
from scenarios.outbox.consumer import Consumer
from scenarios.outbox.deadletter import list_dead_letters
from scenarios.outbox.fanout import AuditConsumer, ensure_queues
from scenarios.strategies import run_transfers
from scenarios.transfer import model as scenario
from scenarios.transfer.destinations import (
    AUDIT,
    EVENT_QUEUES,
    LEDGER_QUEUE,
    TOPIC,
    consumer_queue,
    dead_letter_queue,
)
from scenarios.transfer.invariants import gather_evidence
from scenarios.wiring import open_coordinator, open_stomp

pytestmark = pytest.mark.lab

ACCOUNTS = 20


@pytest.fixture
def fresh(settings: Settings) -> Settings:
    """Tables reset (recovery first), 20 accounts of 1,000 in A and B, queues empty."""
    open_coordinator(settings).close()
    scenario.reset(settings, accounts=ACCOUNTS, balance=1_000)
    return settings


def browse(settings: Settings, queue: str) -> list[Message]:
    """Every message on ``queue`` (a browse), sentinels left out."""
    with open_stomp(settings) as client:
        return [m for m in client.browse(queue, idle_timeout=5.0) if not m.is_sentinel]


@contextmanager
def running(consumer: Consumer) -> Iterator[Consumer]:
    """``consumer`` running on a thread for the block; stopped (and joined) after it."""
    stop = threading.Event()
    worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    worker.start()
    try:
        yield consumer
    finally:
        stop.set()
        worker.join(30)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` every 50 ms until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def audit_kinds(settings: Settings, consumer: str = AUDIT) -> dict[str, str]:
    """transfer id -> the type consumer ``consumer`` recorded in B's audit_log."""
    with psycopg.connect(settings.pg_b) as conn:
        rows = conn.execute(
            "SELECT transfer_id, kind FROM audit_log WHERE consumer = %s", (consumer,)
        ).fetchall()
    return {str(tid): str(kind) for tid, kind in rows}


def test_virtual_topic_copies_on_commit_only_into_queues_that_exist(settings: Settings) -> None:
    """A SEND to the virtual topic in a broker transaction reaches each consumer queue that
    existed, at COMMIT and not after ABORT; a queue created later gets nothing before it."""
    topic = f"/topic/VirtualTopic.probe{secrets.token_hex(4)}"
    first = f"/queue/Consumer.first.{topic.removeprefix('/topic/')}"
    late = f"/queue/Consumer.late.{topic.removeprefix('/topic/')}"
    with open_stomp(settings) as client:
        client.send(topic, "before", {}, receipt_timeout=5)  # no queue yet: nobody gets it
        client.subscribe(first, ack="client-individual", prefetch=1).unsubscribe(timeout=5)
        client.begin("aborted")
        client.send(topic, "aborted", {}, transaction="aborted")
        client.abort("aborted", 5)
        client.begin("committed")
        client.send(topic, "committed", {}, transaction="committed")
        assert [m.body for m in client.browse(first, idle_timeout=2) if not m.is_sentinel] == []
        client.commit("committed", 5)
        client.subscribe(late, ack="client-individual", prefetch=1).unsubscribe(timeout=5)
        bodies = [m.body for m in client.browse(first, idle_timeout=2) if not m.is_sentinel]
        assert bodies == ["committed"]
        assert [m for m in client.browse(late, idle_timeout=2) if not m.is_sentinel] == []


def test_2pc_events_reach_every_consumer_queue_once(fresh: Settings) -> None:
    """2PC publishes one transfer.completed event per committed transfer on the topic; the
    ledger's and each event consumer's queue holds one copy; the credit queue none."""
    transfers = scenario.plan(10, accounts=ACCOUNTS, seed=5)
    output = run_transfers(fresh, "2pc", transfers, concurrency=2)
    assert output["invariants"]["ok"], output["invariants"]
    committed = gather_evidence(fresh).in_a
    assert output["committed"] == len(committed) > 0
    for name in EVENT_QUEUES:
        events = browse(fresh, consumer_queue(name))
        assert sorted(m.headers["transfer-id"] for m in events) == sorted(committed), name
        assert {m.headers[scenario.TYPE_HEADER] for m in events} == {scenario.TRANSFER_COMPLETED}
    assert browse(fresh, scenario.CREDIT_QUEUE) == []


def test_command_published_to_the_topic_is_dead_lettered_by_an_event_consumer(
    fresh: Settings,
) -> None:
    """A credit command published to the events' topic reaches the audit consumer's queue,
    which dead-letters it as a command; the event beside it is recorded."""
    command = scenario.Transfer("cmd-on-topic", "acc-00000", "acc-00001", 5)
    event = scenario.Transfer("event-on-topic", "acc-00000", "acc-00001", 5)
    scenario.drain(fresh, dead_letter_queue(consumer_queue(AUDIT)))  # earlier runs' letters
    with open_stomp(fresh) as client:
        client.send(
            TOPIC, command.body(), command.headers(scenario.CREDIT_COMMAND), receipt_timeout=5
        )
        client.send(
            TOPIC, event.body(), event.headers(scenario.TRANSFER_COMPLETED), receipt_timeout=5
        )
    with running(AuditConsumer(fresh)) as consumer:
        assert wait_for(lambda: consumer.stats.dead_lettered == 1 and consumer.stats.applied == 1)
    assert audit_kinds(fresh) == {event.transfer_id: scenario.TRANSFER_COMPLETED}
    with open_stomp(fresh) as client:
        letters = list_dead_letters(client, consumer_queue(AUDIT))
    assert [(d.transfer_id, d.kind) for d in letters] == [
        (command.transfer_id, scenario.CREDIT_COMMAND)
    ]
    assert "is a command" in letters[0].reason
    assert letters[0].destination == consumer_queue(AUDIT)


def test_event_sent_to_the_command_queue_is_dead_lettered_by_the_credit_consumer(
    fresh: Settings,
) -> None:
    """A transfer.completed event sent to /queue/transfers.credit is dead-lettered as an event;
    the credit command beside it credits B."""
    event = scenario.Transfer("event-on-queue", "acc-00000", "acc-00001", 5)
    command = scenario.Transfer("cmd-on-queue", "acc-00000", "acc-00002", 5)
    with open_stomp(fresh) as client:
        for t, kind in ((event, scenario.TRANSFER_COMPLETED), (command, scenario.CREDIT_COMMAND)):
            client.send(scenario.CREDIT_QUEUE, t.body(), t.headers(kind), receipt_timeout=5)
    with running(Consumer(fresh)) as consumer:
        assert wait_for(lambda: consumer.stats.dead_lettered == 1 and consumer.stats.applied == 1)
    with open_stomp(fresh) as client:
        letters = list_dead_letters(client, scenario.CREDIT_QUEUE)
    assert [(d.transfer_id, d.kind) for d in letters] == [
        (event.transfer_id, scenario.TRANSFER_COMPLETED)
    ]
    assert "is an event" in letters[0].reason
    with psycopg.connect(fresh.pg_b) as conn:
        rows = conn.execute("SELECT transfer_id FROM transfers").fetchall()
    assert [r[0] for r in rows] == [command.transfer_id]


@pytest.mark.parametrize("strategy", ["2pc", "naive"])
def test_a_refused_transfer_is_a_refused_event_the_audit_consumer_reads(
    fresh: Settings, strategy: str
) -> None:
    """A transfer A refuses for lack of funds changes nothing and publishes transfer.refused
    (no transfer.completed); the audit consumer records it beside the completed one."""
    run = secrets.token_hex(3)
    poor = scenario.Transfer(f"poor-{run}", "acc-00003", "acc-00004", 1_001)
    good = scenario.Transfer(f"good-{run}", "acc-00005", "acc-00006", 7)
    output = run_transfers(fresh, strategy, [poor, good], concurrency=1)
    assert (output["committed"], output["aborted"]) == (1, 1), output
    found = gather_evidence(fresh)
    assert found.ok, found.as_dict()
    assert found.refused == {poor.transfer_id: 1}
    assert poor.transfer_id not in found.in_a | found.in_b | set(found.on_queue)
    assert found.on_queue[good.transfer_id] == 1
    assert found.total_now == found.total_expected
    with running(AuditConsumer(fresh)):
        assert wait_for(lambda: len(audit_kinds(fresh)) == 2)
    assert audit_kinds(fresh) == {
        poor.transfer_id: scenario.TRANSFER_REFUSED,
        good.transfer_id: scenario.TRANSFER_COMPLETED,
    }


def test_refused_event_for_a_transfer_that_happened_is_an_anomaly(fresh: Settings) -> None:
    """The checker holds a refusal to be a fact: a transfer.refused event for a transfer in A
    and B is counted (refused_but_done), and the check fails."""
    t = scenario.Transfer(f"both-{secrets.token_hex(3)}", "acc-00007", "acc-00008", 3)
    assert run_transfers(fresh, "2pc", [t], concurrency=1)["committed"] == 1
    with open_stomp(fresh) as client:
        client.send(TOPIC, t.body(), t.headers(scenario.TRANSFER_REFUSED), receipt_timeout=5)
    found = gather_evidence(fresh)
    assert found.refused_but_done == [t.transfer_id]
    assert not found.ok and t.transfer_id in found.anomalies()


def test_sending_before_commit_leaves_an_event_for_a_transfer_that_never_happened(
    fresh: Settings,
) -> None:
    """naive-send-first: the refused transfer's transfer.completed event is out, and A rolled
    back: an atomicity violation; the naive dual write, sending after, has none."""
    run = secrets.token_hex(3)
    poor = scenario.Transfer(f"early-{run}", "acc-00009", "acc-00010", 1_001)
    output = run_transfers(fresh, "naive-send-first", [poor], concurrency=1)
    assert output["aborted"] == 1 and not output["invariants"]["ok"]
    found = gather_evidence(fresh)
    assert found.atomicity_violations == [poor.transfer_id]
    assert poor.transfer_id not in found.in_a | found.in_b
    assert found.on_queue[poor.transfer_id] == 1
    assert [m.headers["transfer-id"] for m in browse(fresh, LEDGER_QUEUE)] == [poor.transfer_id]
    late = dataclasses.replace(poor, transfer_id=f"late-{run}")
    assert run_transfers(fresh, "naive", [late], concurrency=1)["aborted"] == 1
    assert gather_evidence(fresh).atomicity_violations == [poor.transfer_id]


def test_report_counts_the_anomalies_of_sending_before_commit(settings: Settings) -> None:
    """The report's crash runs of naive-send-first: a rollback after the send leaves one
    anomaly per rolled-back transfer."""
    plan = dataclasses.replace(ReportPlan.for_mode(True), crash_transfers=20, crash_every=5)
    ensure_queues(settings)
    found = crash_anomalies(settings, "naive-send-first", plan, seed=3)
    point = found["rollback-after-send"]
    assert point["crashed"] == 4
    assert point["anomalies"] >= point["crashed"]
