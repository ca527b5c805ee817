"""CDC capture: A's business tables decoded by pgoutput, and committed transfers read from them.

The CDC relay (scenarios.outbox.relay) reads what A committed to its
business tables, ``transfers`` and ``accounts`` (the publication
``twopc_cdc``), from the logical replication slot ``twopc_cdc`` through
``pgoutput``, the output plugin PostgreSQL's own logical replication uses.
Nothing is written for CDC's sake: the writer's transaction is the debit
alone (docs/design.md §8).

Changes committed before the slot exists are never decoded, so
:func:`ensure_slot` runs before the CDC strategy's first write; the
publication must exist before the slot (pgoutput looks it up as of each
change's commit), so :func:`ensure_slot` makes it first when a reset did not.

:func:`peek` decodes the slot without consuming it; :func:`explain` turns a
committed transaction into the credit commands it stands for, and sets apart
the changes it cannot explain: a row change says *that* a column changed,
never *why*.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors

from coordinator.errors import ParticipantUnavailable
from scenarios.outbox.failures import OutMessage
from scenarios.outbox.pgoutput import (
    UNCHANGED_TOAST,
    Change,
    RowChange,
    Transaction,
    TransactionAssembler,
    Value,
)
from scenarios.transfer.destinations import recorded_destinations
from scenarios.transfer.model import Transfer
from scenarios.transfer.schema import CDC_PUBLICATION, CDC_SLOT, CDC_TABLES

#: The output plugin of the slot: PostgreSQL's own, built in.
PLUGIN = "pgoutput"

TRANSFERS = "public.transfers"
ACCOUNTS = "public.accounts"


def ensure_slot(dsn: str, slot: str = CDC_SLOT) -> bool:
    """Create the publication and the pgoutput slot if missing; True if this call made the slot.

    Changes committed before the slot exists are never decoded, so this runs
    before the CDC strategy's first write. Creating a slot waits for the
    transactions running at that moment to end.
    """
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ensure_publication(conn)
            row = conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row is not None:
                return False
            try:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, PLUGIN))
            except pg_errors.DuplicateObject:
                return False  # another relay or writer created it first
            return True
    except pg_errors.ObjectNotInPrerequisiteState as exc:
        raise ParticipantUnavailable(
            f"database A cannot decode its WAL ({exc}); set wal_level = logical and "
            "max_replication_slots > 0 (the lab does)",
            participant="TWOPC_PG_A",
        ) from None


def ensure_publication(conn: psycopg.Connection) -> None:
    """The publication of A's business tables (the reset makes it; this covers an older A)."""
    row = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (CDC_PUBLICATION,))
    if row.fetchone() is None:
        with contextlib.suppress(pg_errors.DuplicateObject):  # another relay, same moment
            conn.execute(f"CREATE PUBLICATION {CDC_PUBLICATION} FOR TABLE {', '.join(CDC_TABLES)}")


def set_destination(dsn: str, destination: str) -> None:
    """Where the CDC relay publishes the credits it decodes from now on (relay_positions)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE relay_positions SET destination = %s, updated_at = clock_timestamp() "
            "WHERE name = 'cdc' AND destination IS DISTINCT FROM %s",
            (destination, destination),
        )


def drop_slot(dsn: str, slot: str = CDC_SLOT) -> None:
    """Drop the slot if it exists (it holds back WAL while it lives)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        )


def slot_plugin(dsn: str, slot: str = CDC_SLOT) -> str | None:
    """The output plugin of ``slot``, or None if there is no such slot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return None if row is None else str(row[0])


def peek(
    conn: psycopg.Connection, slot: str = CDC_SLOT, *, changes: int = 1000
) -> list[Transaction]:
    """The committed transactions waiting in ``slot``, oldest first, without consuming them.

    ``changes`` bounds the rows decoded; PostgreSQL stops only between
    transactions, and a transaction the peek cut short anyway is left out (the
    next peek starts from the slot's position and decodes it whole). Each call
    is a new decoding session, with its own Relation messages, so each gets a
    new assembler. Raises psycopg's UndefinedObject if the slot is missing.
    """
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, "
        "'proto_version', '1', 'publication_names', %s)",
        (slot, changes, CDC_PUBLICATION),
    ).fetchall()
    return TransactionAssembler().feed([bytes(row[0]) for row in rows])


@dataclass(frozen=True)
class Explained:
    """What a committed transaction on A means: the credits it asks for, and the rest."""

    credits: list[OutMessage]
    #: Changes with no transfer to explain them (a balance corrected by hand, a delete...).
    unexplained: list[Change]


def explain(transaction: Transaction, destination: str) -> Explained:
    """The messages of a committed transaction on A's business tables: per transfer, one to
    each of ``destination``'s destinations (one, or several comma-separated: the CDC
    fan-out's credit queue and events' topic; the relay gives each the kind its destination
    carries, scenarios.transfer.model.relayed_type).

    The transfer writer's transaction is one debit (scenarios.transfer.model.DEBIT_TO):
    an UPDATE of the source account, then an INSERT into ``transfers`` naming
    the account to credit in B (``counterparty``). So each ``transfers`` insert
    with a counterparty is a credit, from the account updated just before it.
    Every other change is returned unexplained: the WAL says which columns now
    hold what, not why they changed.
    """
    credits: list[OutMessage] = []
    unexplained: list[Change] = []
    debited: RowChange | None = None
    for change in transaction.changes:
        if isinstance(change, RowChange) and change.table == ACCOUNTS:
            if change.operation == "update" and debited is None:
                debited = change
                continue
        elif (
            isinstance(change, RowChange)
            and change.table == TRANSFERS
            and change.operation == "insert"
            and _text(change.new.get("counterparty")) is not None
        ):
            source = _text(debited.new.get("id")) if debited is not None else None
            transfer = Transfer(
                str(_text(change.new.get("transfer_id"))),
                source or "",
                str(_text(change.new.get("counterparty"))),
                int(str(_text(change.new.get("amount")))),
            )
            credits += [
                OutMessage(transfer.transfer_id, to, transfer.body())
                for to in recorded_destinations(destination)
            ]
            debited = None
            continue
        if debited is not None:  # an account update no transfer followed
            unexplained.append(debited)
            debited = None
        unexplained.append(change)
    if debited is not None:
        unexplained.append(debited)
    return Explained(credits, unexplained)


def describe(change: Change) -> str:
    """One line for a change, as a consumer of raw CDC would see it: columns, no reason."""
    if isinstance(change, RowChange):
        columns = change.new or change.old
        values = " ".join(f"{name}={_show(value)}" for name, value in columns.items())
        return f"{change.operation} {change.table}: {values}"
    return f"truncate {', '.join(change.tables)}"


def _text(value: Value) -> str | None:
    if value is None or value is UNCHANGED_TOAST:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _show(value: Value) -> str:
    if value is None:
        return "null"
    if value is UNCHANGED_TOAST:
        return "(unchanged)"
    return repr(value.decode() if isinstance(value, bytes) else value)
