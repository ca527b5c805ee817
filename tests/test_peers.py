"""Many coordinators on one lab (DESIGN §7): application_name, liveness locks, decision rows,
fencing and peer recovery, against the real PostgreSQL and ActiveMQ of the lab."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import psycopg

from scenarios import wiring
from scenarios.config import Settings


def unique_id(stem: str) -> str:
    """A coordinator id no other test uses (letters, digits, dashes; at most 24)."""
    return f"{stem}-{os.getpid() % 10000}-{time.monotonic_ns() % 100000}"[:24]


def sessions_named(dsn: str, application_name: str) -> int:
    """How many sessions of ``dsn``'s server carry ``application_name``."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_every_session_of_a_coordinator_carries_its_id_as_application_name(
    settings: Settings,
) -> None:
    """The branch and recovery sessions of both databases say which coordinator opened them."""
    ident = unique_id("appname")
    mine = replace(settings, coordinator_id=ident)
    coordinator = wiring.open_coordinator(mine, sessions=2)
    try:
        with coordinator.transaction() as tx:
            tx.execute("a", "SELECT 1")
            tx.execute("b", "SELECT 1")
            assert sessions_named(settings.pg_a, ident) >= 1
            assert sessions_named(settings.pg_b, ident) >= 1
    finally:
        coordinator.close()
    assert sessions_named(settings.pg_a, ident) == 0
