"""The CDC strategy: A's local commit writes a cdc_events row that the CDC relay reads from the WAL.

The writer is the outbox writer with another table: nobody reads
``cdc_events`` with SQL. The CDC relay (scenarios.relay) decodes its inserts
from the logical replication slot ``twopc_cdc`` (the test_decoding plugin
that ships with PostgreSQL), so the slot must exist before the first write:
:func:`ensure_slot` creates it, and prepare() calls it. The lines
test_decoding prints are parsed here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import psycopg
from psycopg import errors as pg_errors

from coordinator.errors import ParticipantUnavailable
from scenarios.config import Settings
from scenarios.schema import CDC_SLOT
from scenarios.strategies.outbox import LocalCommitWriter

CDC_INSERT = (
    "INSERT INTO cdc_events (transfer_id, destination, body) "
    "VALUES (%(tid)s, %(destination)s, %(body)s)"
)

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


class CdcStrategy(LocalCommitWriter):
    """A local commit in A; the CDC relay turns the committed insert into the message."""

    def __init__(self, *, before_commit: Callable[[], None] | None = None) -> None:
        super().__init__("cdc", "cdc", CDC_INSERT, before_commit=before_commit)

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        ensure_slot(settings.pg_a)
        super().prepare(settings, concurrency=concurrency)
