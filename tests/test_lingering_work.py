"""Work left waiting in the server, its PREPARE behind it in one pipeline, blocked on a row
lock, is never prepared behind the coordinator's back: a dead process's is ended by the
restarted coordinator's recovery before it looks, and a live coordinator that lost the
session ends it before it rolls the branch back by its gid. A live session's wait is
bounded by the transaction's timeout, at phase 1 too. Sync and asyncio."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from psycopg import sql

from coordinator import Coordinator, FileDecisionLog
from coordinator.aio import AsyncCoordinator
from coordinator.errors import PrepareFailed, TransactionAborted
from participants.aio.pg_branch import AsyncPostgresBranch
from participants.aio.postgres import AsyncPostgresResource
from participants.pg_branch import PostgresBranch
from participants.postgres import PostgresResource
from scenarios.config import Settings
from tests.test_vote import gtrid_of_gid, prepared_gids

TABLE = "lingering_work"
R = TypeVar("R")

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


def _resources(make: Callable[..., R], settings: Settings, cid: str) -> list[R]:
    """A and B, their sessions named by the coordinator's id, as recovery finds them."""
    return [
        make(name, dsn, application_name=cid)
        for name, dsn in (("a", settings.pg_a), ("b", settings.pg_b))
    ]


def _table_with_row(dsn: str, key: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, n int NOT NULL)")
        conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 0)", (key,))


def _wait_until_waiting_on_a_lock(dsn: str, application_name: str) -> None:
    deadline = time.monotonic() + 20
    while not _waiting_on_a_lock(dsn, application_name):
        assert time.monotonic() < deadline, "the work never waited for the lock"
        time.sleep(0.05)


def _cut(fileno: int) -> None:
    """Lose a session on the client's side, as a connection reset does: the socket is shut
    down under libpq, while the server's side waits for its lock and reads nothing."""
    lost = socket.socket(fileno=os.dup(fileno))
    lost.shutdown(socket.SHUT_RDWR)
    lost.close()


def _left_prepared_then_cleared(dsn: str, cid: str) -> set[str]:
    """The gids of ``cid``'s prepared branches, rolled back so that they hold no lock."""
    left = {g for g in prepared_gids(dsn) if gtrid_of_gid(g).startswith(cid)}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for gid in left:
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
    return left


def _row_and_sessions(dsn: str, key: str, cid: str) -> tuple[int, int]:
    """The row's count (0: untouched) and how many sessions ``cid`` still has."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT n FROM {TABLE} WHERE id = %s", (key,)).fetchone()
        sessions = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (cid,)
        ).fetchone()
    assert row is not None and sessions is not None
    return row[0], sessions[0]


def _restart(api: str, cid: str, log: Path, settings: Settings) -> None:
    """Open the coordinator again on its log (its recovery runs), then close it."""
    if api == "sync":
        resources = _resources(PostgresResource, settings, cid)
        Coordinator(cid, FileDecisionLog(str(log)), resources).close()
        return

    async def started() -> None:
        resources = _resources(AsyncPostgresResource, settings, cid)
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
    _table_with_row(settings.pg_a, key)
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
    left = _left_prepared_then_cleared(settings.pg_a, cid)
    assert gtrid and not left
    assert _row_and_sessions(settings.pg_a, key, cid) == (0, 0)


def _lose_session_while_waiting(api: str, cid: str, log: Path, settings: Settings, key: str) -> str:
    """A live coordinator sends A's UPDATE and PREPARE in one pipeline (``prepare_now``) on
    the locked row; once the server shows it waiting, the session is cut on the client's
    side. Returns the error the transaction raised."""
    update = f"UPDATE {TABLE} SET n = n + 1 WHERE id = %s"
    if api == "sync":
        resources = _resources(PostgresResource, settings, cid)
        with Coordinator(cid, FileDecisionLog(str(log)), resources) as coordinator:
            tx = coordinator.begin()
            a = tx.branch("a")
            assert isinstance(a, PostgresBranch)
            a.defer(update, (key,))
            fileno = a.conn.fileno()

            def cut() -> None:
                _wait_until_waiting_on_a_lock(settings.pg_a, cid)
                _cut(fileno)

            cutter = threading.Thread(target=cut)
            cutter.start()
            try:
                with pytest.raises(PrepareFailed) as failed, tx:
                    a.prepare_now()
            finally:
                cutter.join()
            return str(failed.value)

    async def lose() -> str:
        resources = _resources(AsyncPostgresResource, settings, cid)
        coordinator = AsyncCoordinator(cid, FileDecisionLog(str(log)), resources)
        await coordinator.start()
        try:
            tx = coordinator.begin()
            a = await tx.branch("a")
            assert isinstance(a, AsyncPostgresBranch)
            a.defer(update, (key,))
            fileno = a.conn.fileno()

            async def cut() -> None:
                await asyncio.to_thread(_wait_until_waiting_on_a_lock, settings.pg_a, cid)
                _cut(fileno)

            cutter = asyncio.create_task(cut())
            with pytest.raises(PrepareFailed) as failed:
                async with tx:
                    await a.prepare_now()
            await cutter
            return str(failed.value)
        finally:
            await coordinator.close()

    return asyncio.run(lose())


@pytest.mark.lab
@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_a_live_coordinator_ends_the_lost_session_its_prepare_waits_in(
    settings: Settings, tmp_path: Path, api: str
) -> None:
    """A session lost while its UPDATE and PREPARE wait for a row lock: the coordinator ends
    the server's side before it rolls the branch back by its gid, so once the lock is freed
    nothing is prepared or updated (before, the server prepared the branch then)."""
    cid = f"lost-{secrets.token_hex(3)}"
    key = cid
    _table_with_row(settings.pg_a, key)
    with psycopg.connect(settings.pg_a) as holder:
        holder.execute(f"SELECT 1 FROM {TABLE} WHERE id = %s FOR UPDATE", (key,))
        error = _lose_session_while_waiting(api, cid, tmp_path / "decisions.log", settings, key)
    # The holder's transaction ended (rolled back): the row's lock is free.
    time.sleep(0.5)
    assert not _left_prepared_then_cleared(settings.pg_a, cid)
    assert "participant 'a'" in error and "PREPARE TRANSACTION failed" in error
    assert _row_and_sessions(settings.pg_a, key, cid) == (0, 0)


def _commit_behind_the_lock(api: str, cid: str, log: Path, settings: Settings, key: str) -> str:
    """A coordinator with a 1 s timeout defers A's UPDATE of the locked row (it goes with A's
    PREPARE at phase 1) and updates B's. Returns the reason the transaction aborted with."""
    update = f"UPDATE {TABLE} SET n = n + 1 WHERE id = %s"
    if api == "sync":
        resources = _resources(PostgresResource, settings, cid)
        with Coordinator(cid, FileDecisionLog(str(log)), resources, timeout=1.0) as coordinator:
            with pytest.raises(TransactionAborted) as aborted, coordinator.transaction() as tx:
                a = tx.branch("a")
                assert isinstance(a, PostgresBranch)
                a.defer(update, (key,))
                tx.execute("b", update, (key,))
            return aborted.value.reason

    async def commit() -> str:
        resources = _resources(AsyncPostgresResource, settings, cid)
        coordinator = AsyncCoordinator(cid, FileDecisionLog(str(log)), resources, timeout=1.0)
        await coordinator.start()
        try:
            with pytest.raises(TransactionAborted) as aborted:
                async with coordinator.begin() as tx:
                    a = await tx.branch("a")
                    assert isinstance(a, AsyncPostgresBranch)
                    a.defer(update, (key,))
                    await tx.execute("b", update, (key,))
            return aborted.value.reason
        finally:
            await coordinator.close()

    return asyncio.run(commit())


@pytest.mark.lab
@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_the_timeout_cancels_deferred_work_that_waits_at_phase_1(
    settings: Settings, tmp_path: Path, api: str
) -> None:
    """Deferred work that goes with its PREPARE at phase 1 and waits there for a row lock is
    cancelled by the transaction's timeout while the lock is still held: the transaction
    aborts naming the timeout, and neither database keeps anything (before, it waited for
    as long as the lock was held)."""
    cid = f"late-{secrets.token_hex(3)}"
    key = cid
    for dsn in (settings.pg_a, settings.pg_b):
        _table_with_row(dsn, key)
    outcome: dict[str, str] = {}
    with psycopg.connect(settings.pg_a) as holder:
        holder.execute(f"SELECT 1 FROM {TABLE} WHERE id = %s FOR UPDATE", (key,))
        log = tmp_path / "decisions.log"
        worker = threading.Thread(
            target=lambda: outcome.update(
                reason=_commit_behind_the_lock(api, cid, log, settings, key)
            )
        )
        worker.start()
        worker.join(30)
        ended_while_locked = not worker.is_alive()
    # The holder's transaction ended (rolled back): the row's lock is free.
    worker.join(30)
    assert ended_while_locked, "the transaction waited for the lock past its timeout"
    assert "exceeded its timeout during phase 1" in outcome["reason"]
    assert "participant 'a'" in outcome["reason"]
    assert not _left_prepared_then_cleared(settings.pg_a, cid)
    assert not _left_prepared_then_cleared(settings.pg_b, cid)
    assert _row_and_sessions(settings.pg_a, key, cid) == (0, 0)
    assert _row_and_sessions(settings.pg_b, key, cid) == (0, 0)
