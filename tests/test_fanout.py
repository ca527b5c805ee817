"""The CDC fan-out on the real lab: B's credit as a command, the event once to a virtual topic.

The credit consumer reads the commands of /queue/transfers.credit; the audit,
notification and slow consumers each read the events from their own queue of
/topic/VirtualTopic.transfers: the slow one lags while the others converge,
then catches up with nothing lost and no effect twice; a consumer SIGKILLed
and restarted resumes from its queue.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from coordinator.errors import ConfigurationError
from scenarios.config import Settings
from scenarios.outbox import fanout
from scenarios.outbox.cdc import drop_slot
from scenarios.outbox.pipeline import Pipeline, wait_converged
from scenarios.strategies import run_transfers
from scenarios.strategies.cdc import CdcFanoutStrategy
from scenarios.transfer import model as scenario
from tests.cli_process import stop_report
from tests.test_outbox import (
    ACCOUNTS,
    assert_exactly_once,
    fast_config,
    fresh,
    run_writers,
)


@pytest.fixture(scope="module", autouse=True)
def no_slot_left_behind() -> Iterator[None]:
    """Drop the slot after these tests: an unread slot holds back A's WAL."""
    yield
    if "TWOPC_PG_A" in os.environ:
        drop_slot(os.environ["TWOPC_PG_A"])


def audit_rows(settings: Settings, name: str) -> dict[str, int]:
    """transfer id -> duplicates, of consumer ``name``'s audit_log rows."""
    with psycopg.connect(settings.pg_b) as conn:
        return {
            row[0]: row[1]
            for row in conn.execute(
                "SELECT transfer_id, duplicates FROM audit_log WHERE consumer = %s", (name,)
            )
        }


def audit_kinds(settings: Settings) -> set[str]:
    """The message types the event consumers recorded in audit_log."""
    with psycopg.connect(settings.pg_b) as conn:
        return {row[0] for row in conn.execute("SELECT DISTINCT kind FROM audit_log")}


def committed_ids(settings: Settings) -> set[str]:
    with psycopg.connect(settings.pg_a) as conn:
        return {row[0] for row in conn.execute("SELECT transfer_id FROM transfers")}


def test_consumer_queue_follows_the_virtual_topic_naming() -> None:
    """Consumer NAME reads /queue/Consumer.NAME.VirtualTopic.transfers; odd names are refused."""
    assert fanout.TOPIC == "/topic/VirtualTopic.transfers"
    assert fanout.consumer_queue("audit") == "/queue/Consumer.audit.VirtualTopic.transfers"
    with pytest.raises(ConfigurationError):
        fanout.consumer_queue("a.b")
    with pytest.raises(ConfigurationError):
        fanout.consumer_queue("")


def test_every_event_consumer_takes_events_and_refuses_the_others(tmp_path: Path) -> None:
    """audit, notification and slow take the transfer events and refuse a command (and any
    other kind) alike; credit and ledger are not event consumers."""
    from participants.stomp_client import Message
    from scenarios.transfer.model import (
        CREDIT_COMMAND,
        TRANSFER_COMPLETED,
        TRANSFER_REFUSED,
        TYPE_HEADER,
    )

    settings = Settings.load(  # nothing is connected to: any complete settings do
        {
            "TWOPC_HOME": str(tmp_path),
            "TWOPC_PG_A": "host=127.0.0.1 port=5432 dbname=a",
            "TWOPC_PG_B": "host=127.0.0.1 port=5432 dbname=b",
            "TWOPC_STOMP": "127.0.0.1:61613",
            "TWOPC_OPENWIRE": "127.0.0.1:61616",
        }
    )
    consumers = [fanout.make_consumer(settings, name, delay=0) for name in fanout.CONSUMERS]
    events = [
        Message({"transfer-id": "t-1", TYPE_HEADER: TRANSFER_COMPLETED}, "{}"),
        Message({"transfer-id": "t-5", TYPE_HEADER: TRANSFER_REFUSED}, "{}"),
    ]
    others = [
        Message({"transfer-id": "t-2", TYPE_HEADER: CREDIT_COMMAND}, "{}"),
        Message({"transfer-id": "t-3"}, "{}"),
        Message({"transfer-id": "t-4", TYPE_HEADER: "hello"}, "{}"),
        Message({TYPE_HEADER: TRANSFER_COMPLETED}, "{}"),
    ]
    for consumer in consumers:
        assert [consumer.problem_of(m) for m in events] == ["", ""], consumer.name
        reasons = [consumer.problem_of(m) for m in others]
        assert all(reasons), consumer.name
        assert reasons == [consumers[0].problem_of(m) for m in others], consumer.name
        assert "is a command" in reasons[0], consumer.name
    for name in (fanout.CREDIT, fanout.LEDGER):
        with pytest.raises(ConfigurationError, match=name):
            fanout.make_consumer(settings, name)


@pytest.mark.lab
def test_slow_consumer_lags_alone_and_catches_up_with_nothing_lost(settings: Settings) -> None:
    """The slow consumer lags while credit and audit converge; then all hold every event once;
    the event consumers processed events, the credit consumer commands."""
    fresh(settings)
    strategy = CdcFanoutStrategy()
    count = 120
    with Pipeline(
        settings, "cdc", config=fast_config(), fanout=fanout.CONSUMERS, slow_delay=0.05
    ) as pipeline:
        result = run_writers(settings, strategy, count)
        ids = committed_ids(settings)
        assert result.outcomes["committed"] == len(ids) == count
        assert not wait_converged(settings, ids, timeout=60, check=pipeline.check)
        missing = fanout.wait_all(settings, ids, [fanout.AUDIT], timeout=30)
        assert not missing[fanout.AUDIT], "the audit log did not keep up with the credits"
        behind = fanout.processed_counts(settings, ids)[fanout.SLOW]
        assert behind < count, "the slow consumer was not behind when the others had converged"
        missing = fanout.wait_all(settings, ids, timeout=60, check=pipeline.check)
        assert not any(missing.values()), f"lost: {missing}"
    for name in fanout.CONSUMERS:
        rows = audit_rows(settings, name)
        assert set(rows) == ids, f"{name} did not process every event exactly once"
    assert audit_kinds(settings) == {"transfer.completed"}
    assert fanout.duplicate_effects(settings) == 0
    assert_exactly_once(settings)
    lags = fanout.fanout_lags(settings, strategy.committed_at)
    slowest = max(lags[fanout.SLOW].values())
    assert max(lags[fanout.CREDIT].values()) < slowest
    assert max(lags[fanout.AUDIT].values()) < slowest


@pytest.mark.lab
def test_fanout_consumer_killed_and_restarted_resumes_from_its_queue(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL the audit consumer; events published meanwhile wait in its queue and arrive once."""
    fresh(settings)
    strategy = CdcFanoutStrategy()
    strategy.prepare(settings)  # the slot and the consumer queues exist before any write
    strategy.close()
    pipeline = Pipeline(
        settings,
        "cdc",
        processes=True,
        config=fast_config(),
        fanout=fanout.CONSUMERS,
        slow_delay=0.0,
        log_dir=str(tmp_path),
    ).start()
    try:
        run_writers(settings, strategy, 60, concurrency=8)
        first = committed_ids(settings)
        assert not any(fanout.wait_all(settings, first, timeout=60).values())
        pipeline.kill("consumer", fanout.CONSUMERS.index(fanout.AUDIT))
        run_writers(settings, strategy, 60, concurrency=8)
        everything = committed_ids(settings)
        others = [fanout.CREDIT, fanout.SLOW]
        assert not any(fanout.wait_all(settings, everything, others, timeout=60).values())
        assert set(audit_rows(settings, fanout.AUDIT)) == first, "a dead consumer processed"
        pipeline.restart("consumer", fanout.CONSUMERS.index(fanout.AUDIT))
        assert not any(fanout.wait_all(settings, everything, timeout=60).values())
    finally:
        codes = pipeline.stop()
    assert codes == [0] * 5, (
        "SIGTERM must end the four consumers and the relay cleanly: " + stop_report(pipeline)
    )
    assert set(audit_rows(settings, fanout.AUDIT)) == everything
    assert fanout.duplicate_effects(settings) == 0
    assert_exactly_once(settings)


@pytest.mark.lab
def test_transfer_cdc_fanout_reports_each_consumers_lag(settings: Settings) -> None:
    """run_transfers('cdc-fanout') reports p50/p99 lag per consumer, all caught up, no duplicate."""
    scenario.reset(settings, accounts=ACCOUNTS, balance=10_000)
    transfers = scenario.plan(40, accounts=ACCOUNTS, seed=7)
    os.environ[fanout.SLOW_DELAY_SETTING] = "0.03"
    try:
        output = run_transfers(settings, "cdc-fanout", transfers, concurrency=4)
    finally:
        del os.environ[fanout.SLOW_DELAY_SETTING]
    assert output["invariants"]["ok"], output["invariants"]
    report = output["fanout"]
    assert report["duplicate_effects"] == 0
    assert set(report["consumers"]) == set(fanout.WATCHED)
    assert {n: c["kind"] for n, c in report["consumers"].items()} == {
        fanout.CREDIT: "command",
        **{name: "event" for name in fanout.CONSUMERS},
    }
    for name, figures in report["consumers"].items():
        assert figures["not_processed"] == 0, name
        assert {"p50", "p99"} <= set(figures["lag_ms"]), name
    slow = report["consumers"][fanout.SLOW]
    assert slow["lag_ms"]["p99"] > report["consumers"][fanout.CREDIT]["lag_ms"]["p99"]
