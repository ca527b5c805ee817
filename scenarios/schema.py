"""The transfer scenario's tables in databases A and B, for every strategy."""

from __future__ import annotations

# Both databases: the business tables (names fixed: tests, reports and users rely on them).
BUSINESS = [
    "DROP TABLE IF EXISTS transfers",
    "DROP TABLE IF EXISTS accounts",
    """CREATE TABLE accounts (
        id text PRIMARY KEY,
        balance bigint NOT NULL CHECK (balance >= 0)
    )""",
    """CREATE TABLE transfers (
        transfer_id text PRIMARY KEY,
        amount bigint NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
]

# Database A: what the scenario remembers about itself (the money it started with).
META = [
    "DROP TABLE IF EXISTS scenario_meta",
    "CREATE TABLE scenario_meta (key text PRIMARY KEY, value bigint NOT NULL)",
]

SCHEMA_A = [*BUSINESS, *META]
SCHEMA_B = list(BUSINESS)
