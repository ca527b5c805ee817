"""CDC's order: logical decoding delivers committed transactions in commit order, whatever
order they began in.

PostgreSQL decodes a transaction when its commit record is read from the WAL,
so the changes a slot yields come transaction by transaction, in the order the
commits were written; a transaction that began first (the lower xid) but
committed second comes second. The CDC relay (scenarios.outbox.relay) publishes
what it decodes in that order, one batch per STOMP transaction.

:func:`run` shows it on A with the decoder the relay uses (pgoutput, decoded by
scenarios.outbox.pgoutput): pairs of credits to one account, written by two
transactions of which the one begun first commits second. Each row carries
``seq``, its place in commit order (the order the account's credits are meant to
apply in), and ``started``, its place in start order. A table, a publication and a
temporary slot of its own (``ordering_cdc``) keep it out of the CDC strategy's slot.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from scenarios.outbox.pgoutput import RowChange, Transaction, TransactionAssembler
from scenarios.transfer import model as scenario

#: A's table, and the publication of it alone, that the commit-order run writes and decodes.
TABLE = "ordering_cdc"
PUBLICATION = "twopc_ordering_cdc"

SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " run text NOT NULL, account text NOT NULL, seq integer NOT NULL,"
    " started integer NOT NULL, PRIMARY KEY (run, seq))",
    f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}",
)


@dataclass
class CommitOrderResult:
    """What the slot yielded: credits in decoded order, and how they compare to both orders."""

    transactions: int
    #: Credits decoded after a credit that came later in commit order (CDC promises 0).
    commit_order_violations: int
    #: Credits decoded after a credit that started later (the start order is not kept).
    start_order_inversions: int
    #: (seq, started, xid) of each credit, in the order the slot yielded them.
    decoded: list[tuple[int, int, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ensure_schema(conn: psycopg.Connection) -> None:
    for statement in SCHEMA:  # another run at the same moment may have made either
        duplicate = (pg_errors.DuplicateObject, pg_errors.UniqueViolation, pg_errors.DuplicateTable)
        with contextlib.suppress(*duplicate), conn.transaction():
            conn.execute(statement)


def run(dsn: str, *, pairs: int = 5) -> CommitOrderResult:
    """Commit ``pairs`` pairs of credits out of start order on A; decode them; compare."""
    run_id = scenario.new_run_id()
    slot = f"twopc_ordering_{secrets.token_hex(4)}"
    account = f"ord-cdc-{run_id}"
    with psycopg.connect(dsn, autocommit=True) as reader:
        _ensure_schema(reader)
        # Making a slot waits for the transactions running now to end (a prepared one
        # too, which could wait for ever). Temporary: dropped when this session ends.
        reader.execute("SET statement_timeout = '30s'")
        reader.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', true)", (slot,))
        with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
            insert = f"INSERT INTO {TABLE} (run, account, seq, started) VALUES (%s, %s, %s, %s)"
            for pair in range(pairs):
                begun_first, begun_second = 2 * pair + 1, 2 * pair + 2
                # The first to begin commits second: its seq (commit order) is the later one.
                first.execute(insert, (run_id, account, begun_second, begun_first))
                second.execute(insert, (run_id, account, begun_first, begun_second))
                second.commit()
                first.commit()
        rows = reader.execute(
            "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s)",
            (slot, PUBLICATION),
        ).fetchall()
        reader.execute(f"DELETE FROM {TABLE} WHERE run = %s", (run_id,))
    transactions = TransactionAssembler().feed([bytes(row[0]) for row in rows])
    decoded = [credit for t in transactions for credit in _credits(t, run_id)]
    return CommitOrderResult(
        transactions=len(transactions),
        commit_order_violations=out_of_order(seq for seq, _, _ in decoded),
        start_order_inversions=out_of_order(started for _, started, _ in decoded),
        decoded=decoded,
    )


def _credits(transaction: Transaction, run_id: str) -> list[tuple[int, int, int]]:
    return [
        (int(str(change.new["seq"])), int(str(change.new["started"])), transaction.xid)
        for change in transaction.changes
        if isinstance(change, RowChange) and change.new.get("run") == run_id
    ]


def out_of_order(order: Iterable[int]) -> int:
    """How many items come after a greater one: those delivered out of this order."""
    count, highest = 0, None
    for value in order:
        if highest is not None and value < highest:
            count += 1
        highest = value if highest is None else max(highest, value)
    return count
