"""The coordinators' own tables are created once, though many create them at the same moment."""

from __future__ import annotations

import threading

import psycopg
import pytest

from participants.pg_schema import create_table
from scenarios.config import Settings

pytestmark = pytest.mark.lab

SCRATCH = "twopc_schema_race"


def test_a_table_many_sessions_create_at_once_is_created_without_error(
    settings: Settings,
) -> None:
    """Eight sessions creating one missing table at the same moment all succeed, and it exists."""
    with psycopg.connect(settings.pg_a, autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {SCRATCH}")
    sessions = [psycopg.connect(settings.pg_a, autocommit=True) for _ in range(8)]
    together = threading.Barrier(len(sessions))
    failures: list[str] = []

    def create(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        together.wait()
        try:
            create_table(conn, f"CREATE TABLE IF NOT EXISTS {SCRATCH} (n int)", SCRATCH)
        except psycopg.Error as exc:
            failures.append(str(exc))

    threads = [threading.Thread(target=create, args=(conn,)) for conn in sessions]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failures == []
        with psycopg.connect(settings.pg_a, autocommit=True) as admin:
            row = admin.execute("SELECT to_regclass(%s) IS NOT NULL", (SCRATCH,)).fetchone()
            assert row == (True,)
            admin.execute(f"DROP TABLE {SCRATCH}")
    finally:
        for conn in sessions:
            conn.close()
