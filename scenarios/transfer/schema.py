"""The transfer scenario's tables in databases A and B, for every strategy."""

from __future__ import annotations

from outbox.tables import Tables

#: The outbox component's tables as the transfer scenario names them: keyed by transfer
#: id (the ``transfer-id`` header), NOTIFY on ``twopc_outbox``.
TABLES = Tables(key="transfer_id", key_header="transfer-id", channel="twopc_outbox")

# Both databases: the business tables (names fixed: tests, reports and users rely on them).
BUSINESS = [
    "DROP TABLE IF EXISTS transfers",
    "DROP TABLE IF EXISTS accounts",
    """CREATE TABLE accounts (
        id text PRIMARY KEY,
        balance bigint NOT NULL CHECK (balance >= 0)
    )""",
    # counterparty: the account on the other side. A's debit records the account it
    # pays in B (a transfer that did not say whom it paid would be a poor record);
    # B's credit leaves it empty.
    """CREATE TABLE transfers (
        transfer_id text PRIMARY KEY,
        amount bigint NOT NULL,
        counterparty text,
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
]

# Database A: what the scenario remembers about itself: the money it started with
# ('total') and how many accounts each database holds ('accounts').
META = [
    "DROP TABLE IF EXISTS scenario_meta",
    "CREATE TABLE scenario_meta (key text PRIMARY KEY, value bigint NOT NULL)",
]

#: The logical replication slot the CDC relay reads A's changes from (pgoutput).
CDC_SLOT = "twopc_cdc"
#: The publication that says which of A's tables pgoutput decodes: the business tables.
CDC_PUBLICATION = "twopc_cdc"
CDC_TABLES = ("transfers", "accounts")

#: How many partitions the last-id relays share out (one recorded position each).
LAST_ID_PARTITIONS = 4

# Database A: what the outbox strategies write beside the business tables, and what the
# relays keep. The CDC strategy writes nothing here: its relay decodes the business
# tables. The slot is dropped on reset (it would hold back WAL forever when nothing
# reads it); the CDC strategy creates it again before its first write, after the
# publication (pgoutput looks the publication up as of each change it decodes).
OUTBOX = [
    f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
    f"WHERE slot_name = '{CDC_SLOT}'",
    f"DROP PUBLICATION IF EXISTS {CDC_PUBLICATION}",
    f"CREATE PUBLICATION {CDC_PUBLICATION} FOR TABLE {', '.join(CDC_TABLES)}",
    # cdc_events: what the CDC writer once wrote for its relay; dropped where it lingers.
    "DROP TABLE IF EXISTS outbox, cdc_events, outbox_failures, relay_positions",
    # The outbox component's tables (outbox.tables): the outbox, the failure log and
    # the relays' positions, keyed by transfer id, the insert trigger that NOTIFYs.
    *TABLES.schema_a(partitions=LAST_ID_PARTITIONS),
    # The positions of the last-id relays the outbox-last-id strategy runs (a relay
    # makes its own when missing) and of the CDC relay. destination: where the CDC
    # relay publishes (set by the CDC strategy's prepare; NULL means the credit queue).
    f"INSERT INTO relay_positions (name, last_txid, last_id, part) "
    f"SELECT 'last-id:' || p, '0', 0, p FROM generate_series(0, {LAST_ID_PARTITIONS - 1}) p",
    "INSERT INTO relay_positions (name) VALUES ('cdc')",
]

# Database B: the consumer's inbox, one row per transfer id ever applied.
INBOX = [
    "DROP TABLE IF EXISTS inbox",
    *TABLES.schema_b(),
]

# Database B: the CDC fan-out's audit log and slow consumer (scenarios.outbox.fanout), one
# row per (consumer, transfer id) they processed; a redelivery only counts a duplicate.
AUDIT = [
    "DROP TABLE IF EXISTS audit_log",
    """CREATE TABLE audit_log (
        consumer text NOT NULL,
        transfer_id text NOT NULL,
        message_id text NOT NULL,
        kind text NOT NULL,
        body text NOT NULL,
        duplicates integer NOT NULL DEFAULT 0,
        processed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (consumer, transfer_id)
    )""",
]


#: The role the batch job reads A as: SELECT on batch_export only, and every transaction
#: read-only by default (the chapter's "open the database read-only"). The lab makes
#: it (with a password in its passfile); elsewhere the reset makes it, without one.
BATCH_READER = "twopc_batch_reader"

# Database A: what the batch strategy's writer records beside the debit, for the batch
# job to copy. txid orders rows by the writer's transaction, as in the outbox: the job
# reads only below the oldest running transaction, so its position skips nothing.
BATCH_A = [
    "DROP TABLE IF EXISTS batch_export",
    """CREATE TABLE batch_export (
        id bigserial PRIMARY KEY,
        txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        transfer_id text NOT NULL UNIQUE,
        target text NOT NULL,
        amount bigint NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )""",
    "CREATE INDEX batch_export_commit_order ON batch_export (txid, id)",
    # Roles belong to the cluster: made once, kept across resets (a race with another
    # reset making it at the same moment is harmless).
    f"""DO $$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{BATCH_READER}') THEN
            CREATE ROLE {BATCH_READER} LOGIN;
            ALTER ROLE {BATCH_READER} SET default_transaction_read_only = on;
        END IF;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END $$""",
    f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {BATCH_READER}",
    f"GRANT USAGE ON SCHEMA public TO {BATCH_READER}",
    f"GRANT SELECT ON batch_export TO {BATCH_READER}",
]

# Database B: where the batch job got to in A, updated in the same B transaction as the
# credits it copied (and their inbox rows), so that a crash loses both or neither.
BATCH_B = [
    "DROP TABLE IF EXISTS batch_positions",
    """CREATE TABLE batch_positions (
        name text PRIMARY KEY,
        last_txid xid8 NOT NULL DEFAULT '0',
        last_id bigint NOT NULL DEFAULT 0,
        copied bigint NOT NULL DEFAULT 0,
        runs bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )""",
    "INSERT INTO batch_positions (name) VALUES ('batch')",
]

# Database A: thread-sync's retries (scenarios.strategies.thread_retry): work that failed on
# the caller's thread, recorded before the caller hears, run again until done or dead.
THREAD_A = [
    "DROP TABLE IF EXISTS credit_retries",
    """CREATE TABLE credit_retries (
        transfer_id text PRIMARY KEY,
        source text NOT NULL,
        target text NOT NULL,
        amount bigint NOT NULL,
        attempts integer NOT NULL,
        status text NOT NULL CHECK (status IN ('pending', 'done', 'dead')),
        next_at timestamptz NOT NULL,
        last_error text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )""",
    "CREATE INDEX credit_retries_due ON credit_retries (next_at) WHERE status = 'pending'",
]

SCHEMA_A = [*BUSINESS, *META, *OUTBOX, *BATCH_A, *THREAD_A]
SCHEMA_B = [*BUSINESS, *INBOX, *AUDIT, *BATCH_B]
