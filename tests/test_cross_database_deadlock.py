"""Work run on two branches at once (asyncio.gather) can deadlock across the two databases,
which neither PostgreSQL detects; the transaction timeout breaks it (docs/api.md)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import psycopg
import pytest

from coordinator import FileDecisionLog
from coordinator.aio import AsyncCoordinator, AsyncTransaction
from coordinator.errors import TransactionTimeout
from participants.aio.postgres import AsyncPostgresResource
from scenarios.config import Settings
from tests.test_vote import assert_nothing_prepared

TABLE = "crossed_locks"
LOCK = f"UPDATE {TABLE} SET v = v + 1 WHERE id = %s"


def value(dsn: str, key: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT v FROM {TABLE} WHERE id = %s", (key,)).fetchone()
        return int(row[0]) if row else -1


@pytest.mark.lab
def test_crossed_work_on_two_branches_at_once_is_broken_by_the_timeout(
    settings: Settings, tmp_path: Path
) -> None:
    """T1 gathers "lock x in A" and "lock y in B", T2 "lock y in B" and "lock x in A"; each
    takes its first lock, then waits for the other's in the other database. T1's timeout
    cancels its statements and rolls it back, which frees x: T2 then commits both rows."""
    x, y = f"x-{secrets.token_hex(4)}", f"y-{secrets.token_hex(4)}"
    for dsn, key in ((settings.pg_a, x), (settings.pg_b, y)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v int)")
            conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 0)", (key,))

    async def crossed() -> tuple[list[BaseException | None], str, str]:
        coordinator = AsyncCoordinator(
            f"xlock-{secrets.token_hex(3)}",
            FileDecisionLog(str(tmp_path / "decisions.log")),
            [AsyncPostgresResource("a", settings.pg_a), AsyncPostgresResource("b", settings.pg_b)],
        )
        await coordinator.start()
        held = 0
        both_held = asyncio.Event()

        async def first(tx: AsyncTransaction, name: str, key: str) -> None:
            nonlocal held
            await tx.execute(name, LOCK, (key,))
            held += 1
            if held == 2:
                both_held.set()

        async def second(tx: AsyncTransaction, name: str, key: str) -> None:
            await both_held.wait()
            await tx.execute(name, LOCK, (key,))

        async def run(tx: AsyncTransaction, one: tuple[str, str], two: tuple[str, str]) -> None:
            async with tx:
                await asyncio.gather(first(tx, *one), second(tx, *two))

        t1 = coordinator.begin(timeout=1.0)
        t2 = coordinator.begin(timeout=60.0)
        try:
            results = await asyncio.gather(
                run(t1, ("a", x), ("b", y)), run(t2, ("b", y), ("a", x)), return_exceptions=True
            )
        finally:
            await coordinator.close()
        return list(results), t1.gtrid, t2.gtrid

    results, g1, g2 = asyncio.run(crossed())
    assert isinstance(results[0], TransactionTimeout), results
    assert results[1] is None, results
    assert (value(settings.pg_a, x), value(settings.pg_b, y)) == (1, 1)
    assert_nothing_prepared(settings, g1, g2)
