"""Per-account order of credits on a queue: kept by one consumer, lost by competing
consumers, kept again by ActiveMQ's message groups (``JMSXGroupID``).

A producer sends ``credits`` credits to each of ``accounts`` accounts in order
(seq 1, 2, ... per account, the accounts interleaved), in one STOMP transaction,
to a queue of the run's own: the queue holds them in the order sent. The
consumers (each its own STOMP connection, ``client-individual`` ACK, prefetch 1)
apply each credit in B with one UPDATE of the account's row in
``ordering_accounts``: the row lock orders one account's credits as B applies
them, and the statement counts a credit applied after a later credit of its
account (``violations``: the credit was overtaken).

One consumer may be slow (:attr:`OrderingCase.slow`): it holds each credit until
another consumer has applied a later credit of the same account, or ``hold``
seconds have passed (a GC pause, a slow disk). Where the broker hands one
account's credits to several consumers, a reordering is then certain, not a race;
where it does not (one consumer, message groups) the slow consumer only slows.

ActiveMQ's message groups over STOMP: a SEND with the header ``JMSXGroupID``
(here the account) puts the message in that group. The broker gives a group to
the consumer it dispatches the group's first message to, and every later message
of the group to that same consumer while its subscription lives (then another
consumer takes the group over). One consumer applies an account's credits, one at
a time, in queue order; the other consumers take the other groups.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from participants.stomp_client import StompClient
from participants.stomp_core import Message
from participants.stomp_ops import Subscription
from scenarios.config import Settings
from scenarios.transfer import model as scenario
from scenarios.wiring import open_stomp

#: The ActiveMQ header that puts a message in a message group.
GROUP_HEADER = "JMSXGroupID"

#: B's table of the ordering runs: one row per run and account, the credits applied to it.
LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS ordering_accounts (
    run text NOT NULL,
    account text NOT NULL,
    balance bigint NOT NULL DEFAULT 0,
    last_seq integer NOT NULL DEFAULT 0,
    applied integer NOT NULL DEFAULT 0,
    violations integer NOT NULL DEFAULT 0,
    PRIMARY KEY (run, account)
)
"""

#: One credit applied: counted as a violation when a later credit of the account came first.
APPLY = """
UPDATE ordering_accounts
   SET balance = balance + %(amount)s,
       last_seq = GREATEST(last_seq, %(seq)s),
       applied = applied + 1,
       violations = violations + (last_seq > %(seq)s)::int
 WHERE run = %(run)s AND account = %(account)s
"""


@dataclass(frozen=True)
class OrderingCase:
    """How the credits are consumed: how many consumers, grouped or not, one of them slow."""

    name: str
    consumers: int
    groups: bool = False
    slow: bool = False


ONE_CONSUMER = OrderingCase("one consumer", 1)
COMPETING = OrderingCase("competing consumers", 3, slow=True)
GROUPED = OrderingCase("competing consumers, message groups", 3, groups=True, slow=True)

#: The cases of the report, in its order.
CASES = (ONE_CONSUMER, COMPETING, GROUPED)


@dataclass
class OrderingResult:
    """What one case showed: credits sent and applied, and the order violations in B."""

    case: str
    consumers: int
    groups: bool
    accounts: int
    sent: int
    applied: int
    violations: int
    #: Accounts whose credits more than one consumer applied.
    split_accounts: int
    #: Credits each consumer applied (the slow one first when there is one).
    per_consumer: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Progress:
    """What the consumers applied, shared between their threads."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.applied = 0
        self.last_seq: dict[str, int] = {}
        self.consumers_of: dict[str, set[int]] = {}
        self.per_consumer: Counter[int] = Counter()
        self.errors: list[str] = []

    def record(self, consumer: int, account: str, seq: int) -> None:
        with self.changed:
            self.applied += 1
            self.last_seq[account] = max(seq, self.last_seq.get(account, 0))
            self.consumers_of.setdefault(account, set()).add(consumer)
            self.per_consumer[consumer] += 1
            self.changed.notify_all()

    def hold(self, account: str, seq: int, stop: threading.Event, seconds: float) -> None:
        """Until a credit of ``account`` later than ``seq`` is applied, or ``seconds`` pass."""
        with self.changed:
            self.changed.wait_for(
                lambda: stop.is_set() or self.last_seq.get(account, 0) > seq, seconds
            )


def prepare_ledger(settings: Settings, run: str, accounts: list[str]) -> None:
    """B's ``ordering_accounts`` (made if missing) with a row per account of ``run``."""
    with psycopg.connect(settings.pg_b) as conn:
        # Two runs at once may both create it: the loser's error is harmless.
        duplicate = (pg_errors.UniqueViolation, pg_errors.DuplicateTable)
        with contextlib.suppress(*duplicate), conn.transaction():
            conn.execute(LEDGER_DDL)
        conn.execute(
            "INSERT INTO ordering_accounts (run, account) SELECT %s, unnest(%s::text[])",
            (run, accounts),
        )


def ledger_counts(settings: Settings, run: str) -> tuple[int, int]:
    """(credits applied, order violations) that B recorded for ``run``."""
    with psycopg.connect(settings.pg_b) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(applied), 0), coalesce(sum(violations), 0) "
            "FROM ordering_accounts WHERE run = %s",
            (run,),
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def forget_run(settings: Settings, run: str) -> None:
    with psycopg.connect(settings.pg_b) as conn:
        conn.execute("DELETE FROM ordering_accounts WHERE run = %s", (run,))


def send_credits(
    client: StompClient, queue: str, accounts: list[str], credits: int, *, groups: bool
) -> int:
    """Send ``credits`` credits to each account, seq 1.. in order, in one STOMP transaction."""
    transaction = f"ordering-{scenario.new_run_id()}"
    client.begin(transaction)
    sent = 0
    for seq in range(1, credits + 1):
        for account in accounts:
            headers = {"account": account, "seq": str(seq)}
            if groups:
                headers[GROUP_HEADER] = account
            client.send(queue, f"{account} {seq} 1", headers, transaction=transaction)
            sent += 1
    client.commit(transaction, timeout=30.0)
    return sent


def _consume(
    settings: Settings,
    run: str,
    index: int,
    client: StompClient,
    subscription: Subscription,
    progress: _Progress,
    stop: threading.Event,
    hold: float | None,
) -> None:
    """One consumer: apply each credit in B, then ACK it; hold it first if ``hold``."""
    try:
        with psycopg.connect(settings.pg_b, autocommit=True) as conn:
            while not stop.is_set():
                message = subscription.get(0.2)
                if message is None:
                    continue
                account, seq = _credit_of(message)
                if hold is not None:
                    progress.hold(account, seq, stop, hold)
                conn.execute(APPLY, {"run": run, "account": account, "seq": seq, "amount": 1})
                client.ack(message)
                progress.record(index, account, seq)
    except Exception as exc:  # reported by run_case, which then stops waiting
        with progress.changed:
            progress.errors.append(f"consumer {index}: {exc!r}")
            progress.changed.notify_all()


def _credit_of(message: Message) -> tuple[str, int]:
    return message.headers["account"], int(message.headers["seq"])


def run_case(
    settings: Settings,
    case: OrderingCase,
    *,
    accounts: int = 4,
    credits: int = 25,
    hold: float = 0.05,
    timeout: float = 120.0,
) -> OrderingResult:
    """Send the credits, consume them as ``case`` says, count the violations B recorded.

    Every consumer is subscribed before the first credit is sent, so the broker
    dispatches among all of them from the start. RuntimeError if a consumer failed.
    """
    run = scenario.new_run_id()
    queue = f"/queue/ordering.credits.{run}"
    names = [f"ord-{run}-{n:02d}" for n in range(accounts)]
    prepare_ledger(settings, run, names)
    progress = _Progress()
    stop = threading.Event()
    clients: list[StompClient] = []
    threads: list[threading.Thread] = []
    try:
        for i in range(case.consumers):
            clients.append(open_stomp(settings, participant=f"ordering-consumer-{i}"))
            # Subscribed (its receipt awaited) before the first credit is sent.
            subscription = clients[i].subscribe(queue, ack="client-individual", prefetch=1)
            threads.append(
                threading.Thread(
                    target=_consume,
                    args=(settings, run, i, clients[i], subscription, progress, stop),
                    kwargs={"hold": hold if case.slow and i == 0 else None},
                    name=f"ordering-consumer-{i}",
                    daemon=True,
                )
            )
        for thread in threads:
            thread.start()
        start = time.monotonic()
        with open_stomp(settings, participant="ordering-producer") as producer:
            sent = send_credits(producer, queue, names, credits, groups=case.groups)
        with progress.changed:
            progress.changed.wait_for(
                lambda: progress.applied >= sent or bool(progress.errors), timeout
            )
        seconds = time.monotonic() - start
    finally:
        stop.set()
        with progress.changed:
            progress.changed.notify_all()  # a consumer holding a credit lets go at once
        for thread in threads:
            thread.join(10)
        for client in clients:
            client.close()
    if progress.errors:
        raise RuntimeError(f"ordering run {run}: {'; '.join(progress.errors)}")
    applied, violations = ledger_counts(settings, run)
    forget_run(settings, run)
    return OrderingResult(
        case=case.name,
        consumers=case.consumers,
        groups=case.groups,
        accounts=accounts,
        sent=sent,
        applied=applied,
        violations=violations,
        split_accounts=sum(len(c) > 1 for c in progress.consumers_of.values()),
        per_consumer=[progress.per_consumer[i] for i in range(case.consumers)],
        seconds=seconds,
    )
