"""The transfer: debit an account in A, credit one in B, and say so on the broker.

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

from coordinator.errors import TwoPhaseCommitError
from participants.stomp_core import Message
from scenarios.config import Settings
from scenarios.transfer import schema
from scenarios.transfer.destinations import (
    EVENT_QUEUES,
    TOPIC,
    carries_events,
    consumer_queue,
    dead_letter_queue,
)
from scenarios.wiring import open_stomp

#: Each destination carries one kind of message (docs/design.md §8). Events ("this happened",
#: for whoever is interested): published to the virtual topic, read by many consumers, each
#: from its own queue (scenarios.transfer.destinations).
EVENT_TOPIC = TOPIC
#: Commands ("do this", for one receiver): the outbox and CDC relays carry the credit B must
#: apply to its one queue, which is all the credit consumers (inbox and 2pc mode) take.
CREDIT_QUEUE = "/queue/transfers.credit"

#: Every message names its type in this header. A consumer dead-letters a kind it does not
#: take: a command that came through a topic, an event sent to a command queue.
TYPE_HEADER = "type"
#: Event: the transfer is decided and committed (for 2PC and the naive dual write, B holds
#: the credit; for the CDC fan-out, A committed it and B's credit is a command on its way).
TRANSFER_COMPLETED = "transfer.completed"
#: Event: A refused the transfer for lack of funds. A fact with no state changed anywhere.
TRANSFER_REFUSED = "transfer.refused"
EVENT_TYPES: frozenset[str] = frozenset({TRANSFER_COMPLETED, TRANSFER_REFUSED})
#: Command: credit B with this transfer (once).
CREDIT_COMMAND = "transfer.credit"


def relayed_type(destination: str) -> str:
    """The type of a transfer a relay publishes to ``destination``: on an events destination
    (the virtual topic) the event that A committed it, on a queue the credit command."""
    return TRANSFER_COMPLETED if carries_events(destination) else CREDIT_COMMAND


#: A's side of a transfer: the source account debited, and the transfer recorded with the
#: account it pays in B (``counterparty``): a complete record of the business fact, and
#: all that CDC reads from A (scenarios.outbox.cdc). Every strategy debits with it.
DEBIT_TO = (
    "WITH debited AS (UPDATE accounts SET balance = balance - %(amount)s "
    "WHERE id = %(account)s RETURNING id) "
    "INSERT INTO transfers (transfer_id, amount, counterparty) "
    "SELECT %(tid)s, %(amount)s, %(counterparty)s FROM debited"
)
CREDIT = (
    "WITH credited AS (UPDATE accounts SET balance = balance + %(amount)s "
    "WHERE id = %(account)s RETURNING id) "
    "INSERT INTO transfers (transfer_id, amount) SELECT %(tid)s, %(amount)s FROM credited"
)


#: The account count the last reset made when none is given or stored.
DEFAULT_ACCOUNTS = 100


class MissingAccount(TwoPhaseCommitError, LookupError):
    """A debit or credit named an account that does not exist in that database.

    Raised instead of letting the UPDATE match no row (which would create or
    destroy money); every strategy turns it into an abort with this message.
    """

    def __init__(self, account: str, database: str) -> None:
        super().__init__(f"account {account} does not exist in database {database}")
        self.account = account
        self.database = database


def require_applied(rowcount: int, account: str, database: str) -> None:
    """Raise MissingAccount unless the DEBIT or CREDIT just run touched its one row."""
    if rowcount != 1:
        raise MissingAccount(account, database)


def account_ids(conn: psycopg.Connection) -> frozenset[str]:
    """Every account id in the database ``conn`` is connected to."""
    return frozenset(row[0] for row in conn.execute("SELECT id FROM accounts"))


@dataclass(frozen=True)
class Transfer:
    """One planned transfer."""

    transfer_id: str
    source: str  # account in A
    target: str  # account in B
    amount: int

    def headers(self, kind: str) -> dict[str, str]:
        """The headers of this transfer's message of type ``kind``."""
        return {"transfer-id": self.transfer_id, TYPE_HEADER: kind}

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

    def debit(self) -> dict[str, object]:
        """The parameters of DEBIT_TO for this transfer (database A)."""
        return {
            "amount": self.amount,
            "account": self.source,
            "tid": self.transfer_id,
            "counterparty": self.target,
        }

    def credit(self) -> dict[str, object]:
        """The parameters of CREDIT for this transfer (database B)."""
        return {"amount": self.amount, "account": self.target, "tid": self.transfer_id}


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


def reset(settings: Settings, *, accounts: int = DEFAULT_ACCOUNTS, balance: int = 10_000) -> None:
    """(Re)create both databases' tables and balances; empty the queue and its dead letters.

    A's ``scenario_meta`` records the total money ('total') and the account
    count ('accounts'), which later runs plan over (:func:`stored_accounts`).

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
                    "INSERT INTO scenario_meta (key, value) VALUES ('total', %s), ('accounts', %s)",
                    (2 * accounts * balance, accounts),
                )
    # the credits, and the letters of the transfers just dropped
    drain(settings, CREDIT_QUEUE, dead_letter_queue(CREDIT_QUEUE))
    drain_events(settings)


def drain_events(settings: Settings) -> int:
    """Empty the event topic's queues (subscribing creates them, so that none misses an
    event); return how many messages were dropped.

    Nothing consumes them in a benchmark: drained, each contender finds the broker as
    the first one did (the lab's broker caches up to 32 mb of each queue's backlog in its
    heap and pages the rest from its store; docs/own-servers.md).
    """
    return drain(settings, *(consumer_queue(name) for name in EVENT_QUEUES))


def stored_accounts(settings: Settings) -> int | None:
    """The account count the last reset recorded in A, or None if it recorded none.

    Also the check that both databases have the scenario's tables: a missing one
    raises psycopg's UndefinedTable (the CLI says to run 'twopc transfer --reset').
    """
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute("SELECT value FROM scenario_meta WHERE key = 'accounts'").fetchone()
    with psycopg.connect(settings.pg_b) as conn:
        conn.execute("SELECT 1 FROM accounts LIMIT 1")
    return None if row is None else int(row[0])


def recover_and_reset(
    settings: Settings, *, accounts: int = DEFAULT_ACCOUNTS, balance: int = 10_000
) -> None:
    """Resolve what an earlier run left in doubt (its prepared rows hold locks), then reset."""
    from scenarios.wiring import open_coordinator

    open_coordinator(settings).close()
    reset(settings, accounts=accounts, balance=balance)


def drain(settings: Settings, *destinations: str, idle: float = 1.0) -> int:
    """Consume and drop every message on ``destinations``; return how many.

    One subscription per destination, all at once on one connection: their messages
    flow in together, and the drain ends once none has come for ``idle`` seconds.
    """
    received = [0]  # counted by the connection's receiver alone

    def count(_: Message) -> None:
        received[0] += 1

    with open_stomp(settings) as client:
        subscriptions = [
            client.subscribe(destination, ack="auto", prefetch=1000, on_message=count)
            for destination in destinations
        ]
        seen = -1
        while seen != received[0]:
            seen = received[0]
            time.sleep(idle)
        for subscription in subscriptions:
            subscription.unsubscribe(timeout=5.0)  # the receipt: every message acked
    return received[0]
