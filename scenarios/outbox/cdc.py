"""CDC decoding: the logical replication slot on A and the test_decoding lines it yields.

The CDC relay (scenarios.outbox.relay) reads A's committed changes from the
slot ``twopc_cdc`` through the test_decoding plugin that ships with
PostgreSQL. Changes committed before the slot exists are never decoded, so
:func:`ensure_slot` runs before the CDC strategy's first write; the INSERT
lines into ``cdc_events`` are parsed by :func:`parse_insert`.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import errors as pg_errors

from coordinator.errors import ParticipantUnavailable
from scenarios.transfer.schema import CDC_SLOT

#: The table whose inserts are the messages; test_decoding names it with its schema.
CDC_TABLE = "public.cdc_events"


def ensure_slot(dsn: str, slot: str = CDC_SLOT) -> bool:
    """Create the logical replication slot if it is missing; True if this call created it.

    Changes committed before the slot exists are never decoded, so this runs
    before the CDC strategy's first write. Creating a slot waits for the
    transactions running at that moment to end.
    """
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row is not None:
                return False
            try:
                conn.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,)
                )
            except pg_errors.DuplicateObject:
                return False  # another relay or writer created it first
            return True
    except pg_errors.ObjectNotInPrerequisiteState as exc:
        raise ParticipantUnavailable(
            f"database A cannot decode its WAL ({exc}); set wal_level = logical and "
            "max_replication_slots > 0 (the lab does)",
            participant="TWOPC_PG_A",
        ) from None


def drop_slot(dsn: str, slot: str = CDC_SLOT) -> None:
    """Drop the slot if it exists (it holds back WAL while it lives)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        )


_COLUMN = re.compile(r"(\w+)\[[^\]]+\]:(null|'(?:[^']|'')*'|[^ ]+)")


def parse_insert(data: str, table: str = CDC_TABLE) -> dict[str, str | None] | None:
    """The columns of a test_decoding INSERT line into ``table``; None for any other line.

    Lines look like ``table public.cdc_events: INSERT: id[bigint]:7 body[text]:'{"a":1}'``;
    text values are single-quoted with quotes doubled.
    """
    prefix = f"table {table}: INSERT: "
    if not data.startswith(prefix):
        return None
    columns: dict[str, str | None] = {}
    for match in _COLUMN.finditer(data, len(prefix)):
        name, raw = match.group(1), match.group(2)
        if raw == "null":
            columns[name] = None
        elif raw.startswith("'"):
            columns[name] = raw[1:-1].replace("''", "'")
        else:
            columns[name] = raw
    return columns
