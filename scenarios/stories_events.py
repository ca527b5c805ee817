"""Stories of events: a message sent before the transaction ended, and a refusal told as a fact.

``send-before-commit`` shows the rule "send after the transaction ends" broken:
the naive variant that sends its ``transfer.completed`` event inside A's
transaction announces transfers that then roll back. ``transfer-refused-event``
shows an event that records a fact with no state change (the chapter's "login
failed"): A refuses a transfer for lack of funds, nothing changes anywhere, and
the audit consumer still reads the ``transfer.refused`` event from its own
queue of the events' topic.
"""

from __future__ import annotations

import threading
import time

import psycopg

from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.story_kit import Story, balance, evidence, new_transfer, one_transfer
from scenarios.transfer import model as scenario
from scenarios.transfer.destinations import AUDIT, LEDGER_QUEUE
from scenarios.transfer.invariants import gather_evidence


def send_before_commit(settings: Settings) -> Story:
    """The event is sent before A's transaction ends; A rolls back: a message for nothing."""
    from scenarios.strategies.naive import NaiveSendFirstStrategy

    story = Story("send-before-commit")
    poor = new_transfer(source=8, target=9)
    held = balance(settings.pg_a, poor.source)
    poor = scenario.Transfer(poor.transfer_id, poor.source, poor.target, held + 1)
    failed = new_transfer(amount=5, source=10, target=11)
    strategy = NaiveSendFirstStrategy()
    strategy.prepare(settings, concurrency=1)
    try:
        refused = strategy.run_one(poor)
        strategy.arm_crash("rollback-after-send", every=1, action="abandon")
        crashed = strategy.run_one(failed)
    finally:
        strategy.close()
    story.say(
        "'naive-send-first' sends the transfer.completed event inside A's transaction, "
        "before the debit and the commit"
    )
    story.expect(
        refused[0] is Outcome.ABORTED,
        f"transfer {poor.transfer_id} of {poor.amount} ({poor.source} holds {held}):"
        f" {refused[0].value}: {refused[1]}",
    )
    story.expect(
        crashed[0] is Outcome.IN_DOUBT,
        f"transfer {failed.transfer_id}: the event sent, then A's transaction rolled back (a "
        f"failure injected at its commit): {crashed[1]}",
    )
    found = gather_evidence(settings)
    for t in (poor, failed):
        in_a, in_b = int(t.transfer_id in found.in_a), int(t.transfer_id in found.in_b)
        events = found.on_queue.get(t.transfer_id, 0)
        story.expect(
            (in_a, in_b, events) == (0, 0, 1),
            f"evidence: {t.transfer_id}: A.transfers {in_a} rows, B.transfers {in_b} rows, "
            f"transfer.completed events {events} on {LEDGER_QUEUE}: a message for a transfer "
            "that never happened",
        )
    wrong = {poor.transfer_id, failed.transfer_id} & set(found.atomicity_violations)
    story.expect(
        len(wrong) == 2,
        f"the checker counts both as anomalies ({', '.join(sorted(wrong))}); no consumer can "
        "tell them from real ones, and a message sent cannot be taken back. Sending after "
        "the transaction ends ('naive') or inside it ('2pc', an outbox) cannot do this",
    )
    return story


def transfer_refused_event(settings: Settings) -> Story:
    """A refuses a transfer for lack of funds: no state changes, and a transfer.refused event
    tells the audit consumer the fact."""
    from scenarios.outbox.fanout import AuditConsumer, ensure_queues

    story = Story("transfer-refused-event")
    ensure_queues(settings)
    t = new_transfer(source=12, target=13)
    before = balance(settings.pg_a, t.source)
    t = scenario.Transfer(t.transfer_id, t.source, t.target, before + 1)
    outcome, reason = one_transfer(settings, t)
    story.expect(
        outcome is Outcome.ABORTED,
        f"2PC transfer {t.transfer_id} of {t.amount} from {t.source} (balance {before}): "
        f"{outcome.value} ({reason})",
    )
    story.expect(balance(settings.pg_a, t.source) == before, "A's balance is unchanged")
    evidence(story, settings, t, committed=False)
    found = gather_evidence(settings)
    story.expect(
        found.refused.get(t.transfer_id, 0) == 1 and not found.refused_but_done,
        f"evidence: transfer.refused events {found.refused.get(t.transfer_id, 0)} for "
        f"{t.transfer_id} on the events' topic: the fact, with nothing changed",
    )
    consumer = AuditConsumer(settings)
    stop = threading.Event()
    worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    worker.start()
    kind = ""
    deadline = time.monotonic() + 30
    try:
        while not kind and worker.is_alive() and time.monotonic() < deadline:
            kind = _audited(settings, t.transfer_id)
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(30)
    story.expect(
        kind == scenario.TRANSFER_REFUSED,
        f"the {AUDIT} consumer read it from its own queue: audit_log holds {t.transfer_id} "
        f"as {kind or 'nothing'}",
    )
    return story


def _audited(settings: Settings, transfer_id: str) -> str:
    """The kind the audit consumer recorded for ``transfer_id``, or ''."""
    with psycopg.connect(settings.pg_b) as conn:
        row = conn.execute(
            "SELECT kind FROM audit_log WHERE consumer = %s AND transfer_id = %s",
            (AUDIT, transfer_id),
        ).fetchone()
    return str(row[0]) if row else ""
