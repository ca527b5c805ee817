"""The outbox component's tables: their names, and the DDL that makes them.

In the application's database (A):

``outbox``
    One row per message, written in the application's transaction:
    ``id`` (allocation order), ``txid`` (the writer's transaction, which is
    what lets a last-id relay prove it skips nothing), ``part`` (``id %
    partitions``: competing last-id relays share the partitions), the key,
    destination, headers and body, and ``status``: ``'pending'`` for a status
    relay, NULL for rows last-id relays track by position; ``sent``,
    ``failed`` or ``ignored`` once a status relay is done with it.
``outbox_failures``
    Messages a relay gave up on under the ``failure-log`` policy, one row per
    (key, destination), for a retry once the cause is fixed.
``relay_positions``
    Where each last-id relay got to, one row per (relay, partition):
    ``name`` is ``<relay>:<partition>``; a relay makes its rows when it first
    starts, at the beginning of the table.

In the consuming database (B):

``inbox``
    One row per key ever applied; a key already there is a duplicate.

Every name is a field of :class:`Tables`, so the tables can live beside the
application's own under names it picks. The names are SQL identifiers written
into statements: they come from the application, never from a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from coordinator.errors import ConfigurationError

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class Tables:
    """Where the outbox component keeps its rows, and how a message's key travels."""

    outbox: str = "outbox"
    failures: str = "outbox_failures"
    positions: str = "relay_positions"
    inbox: str = "inbox"
    key: str = "message_key"  # the key's column in outbox, failures and inbox
    key_header: str = "message-key"  # the STOMP header that carries the key
    channel: str = "outbox"  # what the outbox's insert trigger NOTIFYs at commit

    def __post_init__(self) -> None:
        for field in ("outbox", "failures", "positions", "inbox", "key", "channel"):
            value = getattr(self, field)
            if not _IDENTIFIER.fullmatch(value):
                raise ConfigurationError(
                    f"outbox tables: {field} {value!r} must be a lower-case SQL identifier"
                )
        if not self.key_header or any(c in self.key_header for c in ":\r\n"):
            raise ConfigurationError(f"outbox tables: bad key header {self.key_header!r}")

    def schema_a(self, *, partitions: int = 1) -> list[str]:
        """CREATE statements for the application's database: outbox, failures, positions.

        ``partitions``: how many partitions competing last-id relays share out
        (each relay name keeps one position per partition).
        """
        if partitions < 1:
            raise ConfigurationError(f"outbox partitions must be >= 1, not {partitions}")
        return [
            f"""CREATE TABLE IF NOT EXISTS {self.outbox} (
                id bigserial PRIMARY KEY,
                txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
                part smallint GENERATED ALWAYS AS (id % {partitions}) STORED,
                {self.key} text NOT NULL UNIQUE,
                destination text NOT NULL,
                headers jsonb NOT NULL DEFAULT '{{}}',
                body text NOT NULL,
                status text CHECK (status IN ('pending', 'sent', 'failed', 'ignored')),
                created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                sent_at timestamptz
            )""",
            f"CREATE INDEX IF NOT EXISTS {self.outbox}_pending ON {self.outbox} (id) "
            "WHERE status = 'pending'",
            f"CREATE INDEX IF NOT EXISTS {self.outbox}_commit_order ON {self.outbox} "
            "(part, txid, id) WHERE status IS NULL",
            f"""CREATE TABLE IF NOT EXISTS {self.failures} (
                {self.key} text NOT NULL,
                source text NOT NULL,
                destination text NOT NULL,
                headers jsonb NOT NULL DEFAULT '{{}}',
                body text NOT NULL,
                attempts integer NOT NULL,
                last_error text NOT NULL,
                failed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                resent_at timestamptz,
                PRIMARY KEY ({self.key}, destination)
            )""",
            f"""CREATE TABLE IF NOT EXISTS {self.positions} (
                name text PRIMARY KEY,
                last_txid xid8,
                last_id bigint,
                lsn pg_lsn,
                destination text,
                part smallint,
                updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
            )""",
            # NOTIFY with the same payload is sent once per transaction, so a
            # statement-level trigger costs one notification per writing transaction.
            f"""CREATE OR REPLACE FUNCTION {self.outbox}_notify() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_notify('{self.channel}', ''); RETURN NULL; END $$""",
            f"DROP TRIGGER IF EXISTS {self.outbox}_notify ON {self.outbox}",
            f"CREATE TRIGGER {self.outbox}_notify AFTER INSERT ON {self.outbox} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {self.outbox}_notify()",
        ]

    def schema_b(self) -> list[str]:
        """CREATE statements for the consuming database: the inbox."""
        return [
            f"""CREATE TABLE IF NOT EXISTS {self.inbox} (
                {self.key} text PRIMARY KEY,
                message_id text NOT NULL,
                outcome text NOT NULL,
                duplicates integer NOT NULL DEFAULT 0,
                applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
            )"""
        ]

    def inbox_insert(self) -> str:
        """The inbox row of one message (key, broker message id, outcome); a row already
        there counts a duplicate. Returns one boolean: true for a fresh row."""
        return (
            f"INSERT INTO {self.inbox} ({self.key}, message_id, outcome) VALUES (%s, %s, %s) "
            f"ON CONFLICT ({self.key}) DO UPDATE SET duplicates = {self.inbox}.duplicates + 1 "
            "RETURNING (xmax = 0)"  # true for a fresh insert, false when the row was there
        )
