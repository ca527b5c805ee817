"""The transfer: debit an account in A, credit one in B, announce it on /queue/transfers.

This module holds what every strategy shares: the plan of transfers, the SQL
of the debit and the credit, and the schema reset. Batches run with
scenarios.transfer.batch; the invariants are checked by
scenarios.transfer.invariants.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from dataclasses import dataclass

import psycopg

from scenarios.config import Settings
from scenarios.transfer import schema
from scenarios.wiring import open_stomp

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
    with open_stomp(settings) as client:
        subscription = client.subscribe(destination, ack="auto", prefetch=1000)
        count = 0
        while subscription.get(1.0) is not None:
            count += 1
        subscription.unsubscribe(timeout=5.0)
    return count
