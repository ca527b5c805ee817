"""The coordinators' own tables, created by whichever coordinator comes first.

``CREATE TABLE IF NOT EXISTS`` is not safe against a concurrent creator: two
sessions that both find the table missing both create it, and the second fails
on a catalog index (``duplicate key value violates unique constraint
"pg_type_typname_nsp_index"``). Coordinators that start together on a new
database do exactly that. :func:`create_table` runs the DDL in a transaction
that first takes an advisory lock keyed by the table's name, so a second
creator waits for the first to commit and then finds the table there.
"""

from __future__ import annotations

from typing import Any, LiteralString

import psycopg

from coordinator.xid import FORMAT_ID

#: The advisory lock a creator holds while it creates ``table``: one bigint key (a key
#: space apart from the coordinators' liveness locks, which use two int keys).
CREATE_LOCK: LiteralString = "SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))"


def create_table(conn: psycopg.Connection[Any], ddl: LiteralString, table: str) -> None:
    """Run ``ddl`` (a ``CREATE TABLE IF NOT EXISTS table``) on the autocommit ``conn``, one
    creator at a time. Raises psycopg.Error as the DDL would."""
    with conn.transaction():
        conn.execute(CREATE_LOCK, (table, FORMAT_ID))
        conn.execute(ddl)
