"""A transaction in doubt at the broker keeps its prepared branches' row locks until the
backlog settles it; the next transaction, on the same broker slot, with its work deferred
to phase 1, waits for one of those locks. Neither may wait for the other: the settle
does not wait for a slot connected again since, and the in-doubt transaction is resolved
while the next one waits, which then commits. Sync and asyncio."""

from __future__ import annotations

import asyncio
import secrets
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from coordinator import failpoints
from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.wiring import open_async_coordinator, open_coordinator
from tests.broker_queues import fresh_queue
from tests.test_vote import gtrid_of_gid, prepared_gids

TABLE = "in_doubt_lock_cycle"
UPDATE = f"UPDATE {TABLE} SET n = n + 1 WHERE id = %s"


def _row(dsn: str, key: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute(f"SELECT n FROM {TABLE} WHERE id = %s", (key,)).fetchone()
    assert found is not None
    return int(found[0])


def _lose_the_receipt(tx: Any) -> None:
    """At the broker's commit point, before the COMMIT goes: its RECEIPT will be dropped."""
    tx.broker._client._answered = lambda waiter, error: None


def _run_sync(settings: Settings, key: str, queue: str) -> tuple[Outcome, Outcome]:
    with open_coordinator(settings, sessions=1, timeout=20.0) as coordinator:
        first = coordinator.begin()
        first.execute("b", UPDATE, (key,))
        first.send(queue, "first")
        failpoints.arm("before_broker_commit", lambda: _lose_the_receipt(first))
        told_first = first.commit()
        with coordinator.transaction() as second:
            second.send(queue, "second")  # the pool's only slot, connected again
            second.branch("b").defer(UPDATE, (key,))  # goes with B's PREPARE, at phase 1
        return told_first, second.outcome


def _run_asyncio(settings: Settings, key: str, queue: str) -> tuple[Outcome, Outcome]:
    async def run() -> tuple[Outcome, Outcome]:
        coordinator = open_async_coordinator(settings, sessions=1, timeout=20.0)
        await coordinator.start()
        try:
            first = coordinator.begin()
            await first.execute("b", UPDATE, (key,))
            await first.send(queue, "first")
            failpoints.arm("before_broker_commit", lambda: _lose_the_receipt(first))
            told_first = await first.commit()
            async with coordinator.begin() as second:
                await second.send(queue, "second")
                (await second.branch("b")).defer(UPDATE, (key,))
            return told_first, second.outcome
        finally:
            await coordinator.close()

    return asyncio.run(run())


@pytest.mark.lab
@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_the_next_transaction_on_the_slot_waits_for_an_in_doubt_lock_only_until_it_is_settled(
    settings: Settings, tmp_path: Path, api: str
) -> None:
    """The first transaction is told IN_DOUBT (its RECEIPT lost), its B branch prepared on
    the row; the second borrows the same broker slot and defers an UPDATE of that row to
    phase 1. The backlog settles the first (committed: its marker is there), which frees
    the row, and the second commits inside its timeout. Before, the settle waited for the
    slot the second held ("its slot stayed busy") while the second waited for the lock:
    the second aborted at its timeout, and before phase 1 had a timeout the two waited
    for each other until the test freed the row."""
    cid = f"cycle{secrets.token_hex(3)}"
    mine = replace(settings, coordinator_id=cid, home=tmp_path)
    key = cid
    with psycopg.connect(settings.pg_b, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, n int NOT NULL)")
        conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 0)", (key,))
    queue = fresh_queue("cycle")
    outcomes: dict[str, tuple[Outcome, Outcome]] = {}
    run = _run_sync if api == "sync" else _run_asyncio
    worker = threading.Thread(target=lambda: outcomes.update(told=run(mine, key, queue)))
    worker.start()
    worker.join(60)
    stuck = worker.is_alive()
    if stuck:  # free the row, so that the worker and the test end
        for gid in prepared_gids(settings.pg_b):
            if gtrid_of_gid(gid).startswith(cid):
                with psycopg.connect(settings.pg_b, autocommit=True) as conn:
                    conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
        worker.join(60)
    failpoints.disarm()
    assert not stuck, "the two transactions waited for each other"
    assert outcomes["told"] == (Outcome.IN_DOUBT, Outcome.COMMITTED)
    assert _row(settings.pg_b, key) == 2
    assert not [g for g in prepared_gids(settings.pg_b) if gtrid_of_gid(g).startswith(cid)]
