"""Work a dead coordinator process left waiting in the server (its work and its PREPARE in one
pipeline, blocked on a row lock) is ended by the restarted coordinator's recovery before it
looks, so that it is never prepared behind recovery's back: sync and asyncio."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from coordinator import Coordinator, FileDecisionLog
from coordinator.aio import AsyncCoordinator
from participants.aio.postgres import AsyncPostgresResource
from participants.postgres import PostgresResource
from scenarios.config import Settings
from tests.test_vote import gtrid_of_gid, prepared_gids

TABLE = "lingering_work"

#: A coordinator process whose branch on A sends its UPDATE and its PREPARE in one pipeline
#: (prepare_now) and waits there for the row lock the test holds.
CHILD = """
import sys
from coordinator import Coordinator, FileDecisionLog
from participants.postgres import PostgresResource
cid, log, dsn_a, dsn_b, key = sys.argv[1:6]
resources = [
    PostgresResource("a", dsn_a, application_name=cid),
    PostgresResource("b", dsn_b, application_name=cid),
]
coordinator = Coordinator(cid, FileDecisionLog(log), resources)
tx = coordinator.begin()
a = tx.branch("a")
a.defer("UPDATE lingering_work SET n = n + 1 WHERE id = %s", (key,))
print(tx.gtrid, flush=True)
a.prepare_now()
"""


def _waiting_on_a_lock(dsn: str, application_name: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'",
            (application_name,),
        ).fetchone()
        return bool(row and row[0])


def _restart(api: str, cid: str, log: Path, settings: Settings) -> None:
    """Open the coordinator again on its log (its recovery runs), then close it."""
    if api == "sync":
        resources = [
            PostgresResource("a", settings.pg_a, application_name=cid),
            PostgresResource("b", settings.pg_b, application_name=cid),
        ]
        Coordinator(cid, FileDecisionLog(str(log)), resources).close()
        return

    async def started() -> None:
        resources = [
            AsyncPostgresResource("a", settings.pg_a, application_name=cid),
            AsyncPostgresResource("b", settings.pg_b, application_name=cid),
        ]
        coordinator = AsyncCoordinator(cid, FileDecisionLog(str(log)), resources)
        await coordinator.start()
        await coordinator.close()

    asyncio.run(started())


@pytest.mark.lab
@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_recovery_ends_the_work_a_killed_coordinator_left_waiting(
    settings: Settings, tmp_path: Path, api: str
) -> None:
    """A coordinator killed while its UPDATE and PREPARE wait for a row lock: the restarted
    coordinator's recovery ends that session, so once the lock is freed nothing of it is
    prepared (before, the server prepared it after recovery had looked)."""
    cid = f"linger-{secrets.token_hex(3)}"
    key = cid
    log = tmp_path / "decisions.log"
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, n int NOT NULL)")
        conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 0)", (key,))
    with psycopg.connect(settings.pg_a) as holder:
        holder.execute(f"SELECT 1 FROM {TABLE} WHERE id = %s FOR UPDATE", (key,))
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, cid, str(log), settings.pg_a, settings.pg_b, key],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            gtrid = child.stdout.readline().strip()
            deadline = time.monotonic() + 20
            while not _waiting_on_a_lock(settings.pg_a, cid):
                assert child.poll() is None and time.monotonic() < deadline, "never waited"
                time.sleep(0.05)
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        _restart(api, cid, log, settings)
    # The holder's transaction ended (rolled back): the row's lock is free.
    time.sleep(0.5)
    left = {g for g in prepared_gids(settings.pg_a) if gtrid_of_gid(g).startswith(cid)}
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        for gid in left:  # what a failure left behind, so that it holds no lock
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
    assert gtrid and not left
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        row = conn.execute(f"SELECT n FROM {TABLE} WHERE id = %s", (key,)).fetchone()
        assert row == (0,)
        leftover = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (cid,)
        ).fetchone()
        assert leftover == (0,)
