"""The transfer: debit an account in A, credit one in B, announce it on /queue/transfers.

This module holds what every strategy shares: the plan of transfers, the SQL
of the debit and the credit, the schema reset, and running a batch with
latencies. The invariants are checked by scenarios.transfer.invariants.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from coordinator.states import Outcome
from participants.stomp_client import StompClient
from scenarios.config import Settings
from scenarios.transfer import schema

QUEUE = "/queue/transfers"

DEBIT = (
    "WITH debited AS (UPDATE accounts SET balance = balance - %(amount)s "
    "WHERE id = %(account)s RETURNING id) "
    "INSERT INTO transfers (transfer_id, amount) SELECT %(tid)s, %(amount)s FROM debited"
)
CREDIT = (
    "WITH credited AS (UPDATE accounts SET balance = balance + %(amount)s "
    "WHERE id = %(account)s RETURNING id) "
    "INSERT INTO transfers (transfer_id, amount) SELECT %(tid)s, %(amount)s FROM credited"
)


@dataclass(frozen=True)
class Transfer:
    """One planned transfer."""

    transfer_id: str
    source: str  # account in A
    target: str  # account in B
    amount: int

    def body(self) -> str:
        return json.dumps(
            {
                "transfer_id": self.transfer_id,
                "from": self.source,
                "to": self.target,
                "amount": self.amount,
            },
            separators=(",", ":"),
        )


def account_id(n: int) -> str:
    return f"acc-{n:05d}"


def new_run_id() -> str:
    """A short id that makes this run's transfer ids unique across runs."""
    return time.strftime("%H%M%S") + secrets.token_hex(3)


def plan(
    count: int,
    *,
    accounts: int,
    seed: int | None = None,
    run_id: str | None = None,
    max_amount: int = 100,
) -> list[Transfer]:
    """``count`` random transfers between the first ``accounts`` accounts (reproducible)."""
    rng = random.Random(seed)
    run = run_id or new_run_id()
    return [
        Transfer(
            f"{run}-{i:06d}",
            account_id(rng.randrange(accounts)),
            account_id(rng.randrange(accounts)),
            rng.randint(1, max_amount),
        )
        for i in range(count)
    ]


# -- set-up ------------------------------------------------------------------


def reset(settings: Settings, *, accounts: int = 100, balance: int = 10_000) -> None:
    """(Re)create both databases' tables and balances and empty the queue.

    Run with no coordinator running: prepared transactions would hold locks
    on the tables (open a coordinator first so that recovery resolves them).
    """
    for dsn, statements in ((settings.pg_a, schema.SCHEMA_A), (settings.pg_b, schema.SCHEMA_B)):
        with psycopg.connect(dsn) as conn:
            conn.execute("SET lock_timeout = '10s'")
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO accounts (id, balance) "
                "SELECT 'acc-' || lpad(n::text, 5, '0'), %s FROM generate_series(0, %s - 1) n",
                (balance, accounts),
            )
            if statements is schema.SCHEMA_A:
                conn.execute(
                    "INSERT INTO scenario_meta (key, value) VALUES ('total', %s)",
                    (2 * accounts * balance,),
                )
    drain(settings, QUEUE)


def recover_and_reset(settings: Settings, *, accounts: int = 100, balance: int = 10_000) -> None:
    """Resolve what an earlier run left in doubt (its prepared rows hold locks), then reset."""
    from scenarios.wiring import open_coordinator

    open_coordinator(settings).close()
    reset(settings, accounts=accounts, balance=balance)


def drain(settings: Settings, destination: str) -> int:
    """Consume and drop every message on ``destination``; return how many."""
    with StompClient.open(settings.stomp) as client:
        subscription = client.subscribe(destination, ack="auto", prefetch=1000)
        count = 0
        while subscription.get(1.0) is not None:
            count += 1
        subscription.unsubscribe(timeout=5.0)
    return count


# -- running a batch ---------------------------------------------------------


@dataclass
class BatchResult:
    """Outcomes and client-visible latencies of one batch."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # committed transfers only
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def percentiles(self) -> dict[str, float]:
        return percentiles(self.latencies_ms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "committed": self.outcomes["committed"],
            "aborted": self.outcomes["aborted"],
            "in_doubt": self.outcomes["in-doubt"],
            "seconds": round(self.seconds, 3),
            "throughput_per_s": round(self.outcomes["committed"] / self.seconds, 1)
            if self.seconds
            else 0.0,
            "latency_ms": self.percentiles(),
            "abort_reasons": dict(self.reasons.most_common(5)),
        }


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of ``values`` (nearest rank)."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p99.9": rank(0.999),
        "max": ordered[-1],
    }


def run_batch(
    transfers: Sequence[Transfer],
    run_one: Callable[[Transfer], tuple[Outcome, str]],
    *,
    concurrency: int,
    on_done: Callable[[], None] | None = None,
) -> BatchResult:
    """Run ``transfers`` on ``concurrency`` threads; collect outcomes and latencies."""
    result = BatchResult()
    lock = threading.Lock()
    cursor = iter(transfers)

    def worker() -> None:
        while True:
            with lock:
                transfer = next(cursor, None)
            if transfer is None:
                return
            start = time.perf_counter()
            outcome, reason = run_one(transfer)
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                result.outcomes[outcome.value] += 1
                if outcome is Outcome.COMMITTED:
                    result.latencies_ms.append(elapsed)
                elif reason:
                    result.reasons[reason.split(":")[0][:80]] += 1
            if on_done is not None:
                on_done()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"transfer-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result
