"""Scenario scripts: short stories of one transfer each, told with evidence from the real services.

``twopc scenario list`` names them; ``twopc scenario run NAME`` runs one.
Each returns its lines and whether what it showed is what 2PC promises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from coordinator.failpoints import failpoint_env
from coordinator.states import Outcome
from coordinator.xid import gtrid_prefix
from scenarios.config import Settings, home_dir
from scenarios.lab.services import Lab
from scenarios.log_setup import configure as configure_logging
from scenarios.stories_events import send_before_commit, transfer_refused_event
from scenarios.stories_ordering import credits_keep_their_order, slow_consumer_holds_producer
from scenarios.stories_peers import three_coordinators_one_killed
from scenarios.stories_pools import pool_queue_full
from scenarios.story_kit import (
    Story,
    balance,
    evidence,
    new_transfer,
    one_transfer,
    prepared_gids,
    recover,
    run_child,
)
from scenarios.transfer import model as scenario
from scenarios.transfer.invariants import gather_evidence
from scenarios.wiring import broker, open_coordinator, open_stomp

# -- the stories -----------------------------------------------------------------


def happy(settings: Settings) -> Story:
    """A transfer commits in A, B and the queue together."""
    story = Story("happy")
    t = new_transfer()
    outcome, _ = one_transfer(settings, t)
    story.expect(outcome is Outcome.COMMITTED, f"transfer {t.transfer_id}: {outcome.value}")
    evidence(story, settings, t, committed=True)
    return story


def no_vote(settings: Settings) -> Story:
    """Insufficient funds in A: A votes NO, nothing is visible anywhere."""
    story = Story("no-vote")
    t = new_transfer()
    before = balance(settings.pg_a, t.source)
    t = scenario.Transfer(t.transfer_id, t.source, t.target, before + 1)
    outcome, reason = one_transfer(settings, t)
    story.expect(
        outcome is Outcome.ABORTED,
        f"transfer of {t.amount} from {t.source} (balance {before}): {outcome.value}",
    )
    story.say(f"why: {reason}")
    evidence(story, settings, t, committed=False)
    story.expect(balance(settings.pg_a, t.source) == before, "A's balance is unchanged")
    return story


def coordinator_dies_after_prepare(settings: Settings) -> Story:
    """The coordinator dies with both branches prepared: their rows stay locked until recovery."""
    story = Story("coordinator-dies-after-prepare")
    t = new_transfer(source=2, target=3)
    gtrid = gtrid_prefix(settings.coordinator_id) + t.transfer_id
    code = run_child(t, "after_prepare=kill@2")
    story.say(f"coordinator process killed (SIGKILL, exit {code}) after both branches prepared")
    prepared = prepared_gids(settings.pg_a, gtrid) + prepared_gids(settings.pg_b, gtrid)
    story.expect(prepared == 2, f"pg_prepared_xacts lists {prepared} branches of {gtrid}")
    waited = try_update(settings.pg_a, t.source, lock_timeout_ms=1000)
    story.expect(
        waited is None,
        "another writer of account "
        f"{t.source} in A waited 1 s for the prepared branch's row lock and gave up",
    )
    recover(story, settings)
    waited = try_update(settings.pg_a, t.source, lock_timeout_ms=1000)
    story.expect(
        waited is not None,
        f"after recovery the same writer gets the row at once ({waited or 0:.1f} ms)",
    )
    evidence(story, settings, t, committed=False)
    return story


def try_update(dsn: str, account: str, *, lock_timeout_ms: int) -> float | None:
    """Milliseconds a no-op UPDATE of ``account`` took, or None if it hit the lock timeout."""
    with psycopg.connect(dsn) as conn:
        conn.execute(f"SET lock_timeout = {int(lock_timeout_ms)}")
        start = time.perf_counter()
        try:
            conn.execute("UPDATE accounts SET balance = balance WHERE id = %s", (account,))
        except pg_errors.LockNotAvailable:
            return None
        finally:
            conn.rollback()
        return (time.perf_counter() - start) * 1000


def broker_down_at_commit_point(settings: Settings) -> Story:
    """The broker dies after phase 1: no COMMIT reached it, so the transaction aborts."""
    story = Story("broker-down-at-commit-point")
    lab = Lab(home_dir())
    t = new_transfer(source=4, target=5)
    coordinator = open_coordinator(settings, sessions=2)
    try:
        tx = coordinator.begin(gtrid_prefix(settings.coordinator_id) + t.transfer_id)
        tx.execute("a", scenario.DEBIT_TO, t.debit())
        tx.execute(
            "b", scenario.CREDIT, {"amount": t.amount, "account": t.target, "tid": t.transfer_id}
        )
        tx.send(scenario.EVENT_TOPIC, t.body(), t.headers(scenario.TRANSFER_COMPLETED))
        pid = lab.kill("activemq")
        story.say(f"work done; the broker (pid {pid}) is killed before the commit")
        outcome = tx.commit()
        story.expect(outcome is not Outcome.COMMITTED, f"outcome: {outcome.value} ({tx.reason})")
    finally:
        coordinator.close()
        lab.start_service("activemq")
    story.say("broker restarted")
    if outcome is Outcome.IN_DOUBT:
        recover(story, settings)
    evidence(story, settings, t, committed=False)
    return story


def postgres_restart_while_prepared(settings: Settings) -> Story:
    """PostgreSQL B restarts with a branch prepared and the decision made: recovery commits it."""
    story = Story("postgres-restart-while-prepared")
    lab = Lab(home_dir())
    t = new_transfer(source=6, target=7)
    gtrid = gtrid_prefix(settings.coordinator_id) + t.transfer_id
    code = run_child(t, "after_decision=kill")
    story.say(f"coordinator killed (exit {code}) after the commit point, before phase 2")
    lab.stop_service("pg-b", immediate=True)
    lab.start_service("pg-b")
    survived = prepared_gids(settings.pg_b, gtrid)
    story.expect(
        survived == 1,
        f"PostgreSQL B stopped (immediate) and restarted: "
        f"its prepared branch survived ({survived} in pg_prepared_xacts)",
    )
    recover(story, settings)
    evidence(story, settings, t, committed=True)
    return story


def slow_cdc_consumer(settings: Settings) -> Story:
    """CDC fan-out: a slow consumer lags on its own queue; the others do not wait; none lost."""
    from scenarios.outbox import fanout
    from scenarios.outbox.pipeline import Pipeline, wait_converged
    from scenarios.strategies.cdc import CdcFanoutStrategy
    from scenarios.transfer.batch import run_batch
    from scenarios.transfer.results import percentiles

    story = Story("slow-cdc-consumer")
    strategy = CdcFanoutStrategy()
    strategy.prepare(settings, concurrency=4)
    transfers = [new_transfer(amount=1) for _ in range(30)]
    story.say(
        f"30 transfers commit on A; the CDC relay sends each one's credit command to B's one "
        f"queue and its transfer.completed event once to {fanout.TOPIC}, copied to the queues "
        f"of {', '.join(fanout.CONSUMERS)} (the slow one waits 0.3 s before each message)"
    )
    try:
        with Pipeline(settings, "cdc", fanout=fanout.CONSUMERS, slow_delay=0.3) as running:
            run_batch(transfers, strategy.run_one, concurrency=4)
            ids = set(strategy.committed_at)
            missing = wait_converged(settings, ids, timeout=60, check=running.check)
            fast = [name for name in fanout.CONSUMERS if name != fanout.SLOW]
            behind = fanout.wait_all(settings, ids, fast, timeout=60, check=running.check)
            counts = fanout.processed_counts(settings, ids)
            story.expect(
                not missing and not any(behind.values()),
                f"B credited ({counts[fanout.CREDIT]} of {len(ids)}), and "
                + ", ".join(f"{name} {counts[name]}" for name in fast)
                + " of them: the fast consumers are done",
            )
            story.expect(
                counts[fanout.SLOW] < len(ids),
                f"meanwhile the slow consumer has processed {counts[fanout.SLOW]}: the rest "
                "wait in its own queue",
            )
            left = fanout.wait_all(settings, ids, timeout=60, check=running.check)
            story.expect(
                not any(left.values()), "it catches up: every consumer processed every event"
            )
    finally:
        strategy.close()
    lags = fanout.fanout_lags(settings, strategy.committed_at)
    for name in fanout.WATCHED:
        p = percentiles(list(lags[name].values()))
        story.say(f"{name} lag from A's commit: p50 {p['p50']:.0f} ms, p99 {p['p99']:.0f} ms")
    story.expect(
        fanout.duplicate_effects(settings) == 0,
        "evidence: no effect twice in B (inbox and audit_log rows unique per consumer)",
    )
    return story


def cdc_change_without_reason(settings: Settings) -> Story:
    """CDC of A's business rows: a transfer arrives with its reason, a balance corrected by
    hand only as a changed column."""
    from scenarios.outbox.cdc import describe as describe_change
    from scenarios.outbox.cdc import explain, peek
    from scenarios.outbox.pipeline import Pipeline, wait_converged
    from scenarios.outbox.relay import CdcRelay
    from scenarios.strategies.cdc import CdcStrategy

    story = Story("cdc-change-without-reason")
    strategy = CdcStrategy()
    strategy.prepare(settings, concurrency=1)
    t = new_transfer(amount=25, source=2, target=5)
    fee_from, fee_to = scenario.account_id(3), scenario.account_id(4)
    try:
        outcome, _ = strategy.run_one(t)
    finally:
        strategy.close()
    story.expect(
        outcome is Outcome.COMMITTED,
        f"the CDC writer commits transfer {t.transfer_id} on A: the debit and the transfers "
        "row, nothing else",
    )
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute("SELECT pg_current_xact_id()").fetchone()
        xid = str(row[0]) if row else ""
        conn.execute("UPDATE accounts SET balance = balance - 7 WHERE id = %s", (fee_from,))
        conn.execute("UPDATE accounts SET balance = balance + 7 WHERE id = %s", (fee_to,))
    story.say(
        f"then someone moves 7 from {fee_from} to {fee_to} by hand on A (a fee refunded? a "
        "fraud reversed? an error fixed? only the person knows)"
    )
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        decoded = peek(conn)
    ours = [x for x in decoded if str(x.xid) == xid or _credits_of(x, t.transfer_id)]
    unexplained = 0
    for transaction in ours:
        explained = explain(transaction, scenario.CREDIT_QUEUE)
        for credit in explained.credits:
            story.say(f"decoded: a transfers row -> credit {credit.transfer_id}: {credit.body}")
        for change in explained.unexplained:
            unexplained += 1
            story.say(f"decoded: {describe_change(change)} -- and no reason")
    story.expect(
        unexplained == 2,
        "evidence: the correction arrives as two balance changes: that the columns changed, "
        "not why "
        "(like a password column: changed by its owner, or by an attacker?)",
    )
    with Pipeline(settings, "cdc") as running:
        missing = wait_converged(settings, {t.transfer_id}, timeout=60, check=running.check)
        story.expect(not missing, f"the relay sends the transfer; B credits {t.target} once")
        relay = running.relay_workers()[0].runner
        counted = isinstance(relay, CdcRelay) and relay.stats.unexplained >= 2
        story.expect(
            counted,
            "the relay counts the correction's changes as unexplained and sends nothing for "
            "them: no consumer could tell a refund from a reversal",
        )
    return story


def _credits_of(transaction: Any, transfer_id: str) -> bool:
    """Whether a decoded transaction is the credit of ``transfer_id``."""
    from scenarios.outbox.cdc import explain

    credits = explain(transaction, scenario.CREDIT_QUEUE).credits
    return any(c.transfer_id == transfer_id for c in credits)


def scenario_queued(settings: Settings) -> Counter[str]:
    """transfer id -> credit commands on /queue/transfers.credit (a browse)."""
    from scenarios.transfer.invariants import queued_transfer_ids

    return queued_transfer_ids(settings, scenario.CREDIT_QUEUE)


def fence_broker_sessions(settings: Settings, coordinator_id: str, timeout: float = 30.0) -> None:
    """Take over every broker client-id of ``coordinator_id``: on return the broker has
    processed the end of its dead connections (their open transactions rolled back)."""
    mq = broker(settings, pool_size=1, coordinator_id=coordinator_id)
    try:
        mq.fence(timeout)
    finally:
        mq.close()


def _child_env(settings: Settings, setting: str, value: str) -> dict[str, str]:
    return {**os.environ, **settings.as_env(), setting: value}


def thread_pool_dies_with_work_queued(settings: Settings) -> Story:
    """Fire-and-forget on a thread pool: the process dies with credits queued, and they are lost."""
    from scenarios.crash_plan import CRASH_SETTING

    story = Story("thread-pool-dies-with-work-queued")
    before = gather_evidence(settings)
    lost_before = before.in_a - before.in_b
    story.say(
        "a 'twopc transfer --strategy thread' process commits each debit in A, queues B's "
        "credit and the message on a pool of 4 threads, and answers 'committed' at once"
    )
    command = [
        sys.executable, "-m", "scenarios.cli", "transfer", "--strategy", "thread",
        "--count", "60", "--concurrency", "8", "--no-check",
    ]  # fmt: skip
    env = _child_env(settings, CRASH_SETTING, "process-dies-with-queue=kill@10")
    child = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
    story.expect(child.returncode == -9, "SIGKILL of the process while its pool's queue held work")
    after = gather_evidence(settings)
    lost = (after.in_a - after.in_b) - lost_before
    story.expect(bool(lost), f"{len(lost)} transfers debited in A were never credited in B")
    story.say(
        f"evidence: A holds {len(after.in_a - before.in_a)} new transfers, B "
        f"{len(after.in_b - before.in_b)}; money now {after.total_now} of {after.total_expected}; "
        f"the lost ones (e.g. {', '.join(sorted(lost)[:2])}) are atomicity violations"
    )
    story.say(
        "nothing recorded the queued work: no retry can find it; the remedy (--strategy "
        "thread-sync) runs it on the caller's thread, or an outbox makes it durable first"
    )
    return story


def batch_rerun_after_crash(settings: Settings) -> Story:
    """The batch job is SIGKILLed between reading A and committing B; the re-run copies once."""
    from scenarios.outbox.batchjob import BATCH_CRASH_SETTING, BatchConfig, BatchJob, position
    from scenarios.strategies.batch import BatchStrategy
    from scenarios.transfer.batch import run_batch

    story = Story("batch-rerun-after-crash")
    accounts = scenario.stored_accounts(settings) or scenario.DEFAULT_ACCOUNTS
    strategy = BatchStrategy()
    strategy.prepare(settings, concurrency=4)
    transfers = scenario.plan(30, accounts=accounts, seed=13)
    try:
        result = run_batch(transfers, strategy.run_one, concurrency=4)
    finally:
        strategy.close()
    _, _, copied_before = position(settings)
    story.say(f"A committed {result.outcomes['committed']} debits with their batch_export rows")
    command = [sys.executable, "-m", "scenarios.cli", "batch", "--once", "--chunk", "10"]
    env = _child_env(settings, BATCH_CRASH_SETTING, "after-read=kill@2")
    child = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
    story.expect(child.returncode == -9, "'twopc batch --once' SIGKILLed after reading chunk 2")
    _, _, copied = position(settings)
    story.expect(copied - copied_before == 10, "B kept chunk 1 and its position; chunk 2 is gone")
    env.pop(BATCH_CRASH_SETTING)
    rerun = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
    txid, last_id, copied = position(settings)
    story.expect(
        rerun.returncode == 0 and copied - copied_before == result.outcomes["committed"],
        f"the re-run began at the recorded position and copied the rest (position now: "
        f"txid {txid}, id {last_id})",
    )
    with psycopg.connect(settings.pg_b) as conn:
        conn.execute("UPDATE batch_positions SET last_txid = '0', last_id = 0")
    job = BatchJob(settings, BatchConfig(chunk=100))
    try:
        job.run_once()
    finally:
        job.close()
    story.expect(job.stats.copied == 0, "a run over everything again credits nothing twice")
    # The evidence is about this story's transfers only: earlier stories (the thread pool's
    # lost work, by design) may have left the databases out of balance.
    ids = [t.transfer_id for t in transfers]
    debited = _amounts(settings.pg_a, ids)
    credited = _amounts(settings.pg_b, ids)
    story.expect(
        len(debited) == result.outcomes["committed"] and debited == credited,
        f"evidence: each of the {len(debited)} debits in A is credited once in B with its "
        f"amount; {job.stats.duplicates} found in B's inbox already",
    )
    return story


def _amounts(dsn: str, transfer_ids: list[str]) -> dict[str, int]:
    """transfer id -> amount of the ``transfers`` rows of these ids in the database ``dsn``."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT transfer_id, amount FROM transfers WHERE transfer_id = ANY(%s)",
            (transfer_ids,),
        ).fetchall()
    return {row[0]: int(row[1]) for row in rows}


def consumer_2pc_dies_after_prepare(settings: Settings) -> Story:
    """A 2PC consumer dies between B's PREPARE and the commit; recovery, then it credits once."""
    from scenarios.outbox.consumer import CONSUMER_CRASH_SETTING
    from scenarios.outbox.consumer_2pc import TwoPhaseConsumer
    from scenarios.wiring import consumer_coordinator_id

    story = Story("consumer-2pc-dies-after-prepare")
    t = new_transfer(amount=7, source=2, target=3)
    prefix = gtrid_prefix(consumer_coordinator_id(settings))

    def b_prepared() -> int:
        with psycopg.connect(settings.pg_b) as conn:
            return sum(1 for x in conn.tpc_recover() if x.gtrid.startswith(prefix))

    def on_queue() -> int:
        return scenario_queued(settings).get(t.transfer_id, 0)

    scenario.drain(settings, scenario.CREDIT_QUEUE)  # this story's command alone on the queue
    b_before = balance(settings.pg_b, t.target)
    with open_stomp(settings, participant="story-broker") as client:
        client.send(
            scenario.CREDIT_QUEUE,
            t.body(),
            {"transfer-id": t.transfer_id, scenario.TYPE_HEADER: scenario.CREDIT_COMMAND},
            receipt_timeout=10.0,
        )
    story.say(f"a credit command for {t.transfer_id} ({t.amount} to {t.target}) is on the queue")
    command = [sys.executable, "-m", "scenarios.cli", "consumer", "--mode", "2pc"]
    env = {
        **_child_env(settings, CONSUMER_CRASH_SETTING, ""),
        "TWOPC_LOG_LEVEL": "WARNING",
        **failpoint_env("after_prepare=kill@1"),
    }
    child = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
    story.expect(
        child.returncode == -9,
        "'twopc consumer --mode 2pc' received it, credited B in an XA branch, ACKed it in the "
        "broker transaction, PREPAREd B, and was SIGKILLed before the commit point",
    )
    # A browse does not show a message ACKed in an open transaction: it is back on the queue
    # only once the broker has processed the end of the dead connection, some time after
    # the process is gone. Taking over the dead consumer's client-ids (as its recovery will)
    # proves the broker has; only then does the queue say what the crash left.
    fence_broker_sessions(settings, consumer_coordinator_id(settings))
    story.say("its broker sessions fenced: the broker has let go of the dead connection")
    story.expect(
        (b_prepared(), balance(settings.pg_b, t.target) - b_before, on_queue()) == (1, 0, 1),
        f"after the crash: B pg_prepared_xacts {b_prepared()} entry (the credit, invisible), "
        f"balance of {t.target} +{balance(settings.pg_b, t.target) - b_before}, the message "
        f"back on /queue/transfers.credit ({on_queue()}: its ACK died uncommitted with the "
        "connection)",
    )
    consumer = TwoPhaseConsumer(settings, name="story-consumer")
    stop = threading.Event()
    worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while consumer.stats.applied < 1 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    worker.join(30)
    recovered = consumer.recovered
    story.expect(
        recovered.get("rolled_back", 0) == 1 and recovered.get("committed", 0) == 0,
        f"a consumer started again recovers first: no commit marker for the prepared branch, so "
        f"it rolls back ({recovered}); then it takes the redelivered message",
    )
    with psycopg.connect(settings.pg_b) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM transfers WHERE transfer_id = %s", (t.transfer_id,)
        ).fetchone()
    in_b = int(rows[0]) if rows else 0
    credited = balance(settings.pg_b, t.target) - b_before
    story.expect(
        (in_b, credited, b_prepared(), on_queue()) == (1, t.amount, 0, 0),
        f"evidence: B.transfers {in_b} row, {t.target} credited +{credited} (once), "
        f"pg_prepared_xacts {b_prepared()} entries, /queue/transfers.credit {on_queue()} message",
    )
    return story


STORIES: dict[str, Callable[[Settings], Story]] = {
    "happy": happy,
    "no-vote": no_vote,
    "coordinator-dies-after-prepare": coordinator_dies_after_prepare,
    "broker-down-at-commit-point": broker_down_at_commit_point,
    "postgres-restart-while-prepared": postgres_restart_while_prepared,
    "slow-cdc-consumer": slow_cdc_consumer,
    "cdc-change-without-reason": cdc_change_without_reason,
    "thread-pool-dies-with-work-queued": thread_pool_dies_with_work_queued,
    "batch-rerun-after-crash": batch_rerun_after_crash,
    "consumer-2pc-dies-after-prepare": consumer_2pc_dies_after_prepare,
    "three-coordinators-one-killed": three_coordinators_one_killed,
    "credits-keep-their-order": credits_keep_their_order,
    "slow-consumer-holds-producer": slow_consumer_holds_producer,
    "pool-queue-full": pool_queue_full,
    "send-before-commit": send_before_commit,
    "transfer-refused-event": transfer_refused_event,
}


def describe(name: str) -> str:
    doc = STORIES[name].__doc__ or ""
    return doc.strip().splitlines()[0]


def _child(argv: list[str]) -> None:
    """``python -m scenarios.stories one ID SOURCE TARGET AMOUNT``: one transfer."""
    if len(argv) != 5 or argv[0] != "one":
        raise SystemExit("usage: python -m scenarios.stories one ID SOURCE TARGET AMOUNT")
    configure_logging()
    t = scenario.Transfer(argv[1], argv[2], argv[3], int(argv[4]))
    outcome, _ = one_transfer(Settings.load(), t)
    print(outcome.value)


if __name__ == "__main__":
    _child(sys.argv[1:])
