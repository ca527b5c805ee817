"""PostgresResource over the application's psycopg_pool.ConnectionPool, or a connection
factory, and AsyncPostgresResource over an AsyncConnectionPool or an async factory:
transactions, recovery and in-doubt handling use only the connections given."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from coordinator.aio import AsyncCoordinator
from coordinator.coordinator import Coordinator
from coordinator.errors import ConfigurationError
from coordinator.log.file import FileDecisionLog
from coordinator.recovery import RecoveryReport
from coordinator.states import Outcome
from coordinator.xid import FORMAT_ID, Xid
from participants.aio.postgres import AsyncPostgresResource
from participants.postgres import PostgresResource
from scenarios.config import Settings

MAX_SIZE = 2


@pytest.fixture
def probe(settings: Settings) -> str:
    """A table 'pool_probe' in A and in B."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS pool_probe (x int)")
    return "pool_probe"


class SessionWatch:
    """Samples pg_stat_activity of A and B for sessions named ``app``; keeps the maximum."""

    def __init__(self, settings: Settings, app: str) -> None:
        self.dsns = {"a": settings.pg_a, "b": settings.pg_b}
        self.app = app
        self.most = {"a": 0, "b": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conns = {n: psycopg.connect(d, autocommit=True) for n, d in self.dsns.items()}
        try:
            while not self._stop.is_set():
                for name, conn in conns.items():
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                        (self.app,),
                    ).fetchone()
                    self.most[name] = max(self.most[name], int(row[0]) if row else 0)
                self.samples += 1
                time.sleep(0.002)
        finally:
            for conn in conns.values():
                conn.close()

    def __enter__(self) -> SessionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def pool_app() -> str:
    """An application_name for this test's pool sessions only."""
    return f"twopc-pool-{os.getpid()}-{time.monotonic_ns()}"


def pool_dsns(settings: Settings, app: str) -> dict[str, str]:
    # The name is in the connection string itself: a connection the resource opened
    # from pool.conninfo behind the pool's back would be counted too.
    return {
        name: f"{dsn} application_name={app}"
        for name, dsn in (("a", settings.pg_a), ("b", settings.pg_b))
    }


def left_xid(api: str) -> Xid:
    """The gtrid of the branch each pool test prepares by hand and leaves to recovery."""
    return Xid.branch(f"pooltest.left-{api}-{os.getpid()}-{time.monotonic_ns()}", "a")


def run_threaded(
    settings: Settings, probe: str, tmp_path: Path
) -> tuple[list[Outcome], RecoveryReport, Xid, dict[Xid, Any], SessionWatch, list[int]]:
    """The sync API: forty transactions from eight threads over the pools, then recovery."""
    app = pool_app()
    made = {
        name: ConnectionPool(dsn, min_size=1, max_size=MAX_SIZE, open=True, timeout=30)
        for name, dsn in pool_dsns(settings, app).items()
    }
    resources = [PostgresResource(name, pool) for name, pool in made.items()]
    coordinator = Coordinator(
        "pooltest",
        FileDecisionLog(tmp_path / "decisions.log"),
        resources,
        housekeeping_interval=None,
    )

    def one(i: int) -> Outcome:
        with coordinator.transaction() as tx:
            tx.execute("a", "INSERT INTO pool_probe VALUES (%s)", (i,))
            tx.execute("b", "INSERT INTO pool_probe VALUES (%s)", (i,))
        return tx.outcome  # type: ignore[return-value]

    try:
        with SessionWatch(settings, app) as watch:
            try:
                with ThreadPoolExecutor(8) as workers:
                    outcomes = list(workers.map(one, range(40)))
                # A branch prepared by hand and left: recovery lists and resolves it from
                # the pool.
                xid = left_xid("sync")
                branch = resources[0].begin(xid)
                branch.execute("INSERT INTO pool_probe VALUES (-1)")
                branch.prepare()
                branch.conn.close()  # the session dies; the branch lives on in the server
                branch.release()
                report = coordinator.recover(fence_timeout=5)
            finally:
                coordinator.close()
        left = resources[0].recover(FORMAT_ID, "pooltest.")
        return (
            outcomes,
            report,
            xid,
            left,
            watch,
            [p.get_stats()["pool_size"] for p in made.values()],
        )
    finally:
        for pool in made.values():
            pool.close()


def run_asyncio(
    settings: Settings, probe: str, tmp_path: Path
) -> tuple[list[Outcome], RecoveryReport, Xid, dict[Xid, Any], SessionWatch, list[int]]:
    """The asyncio API: forty transactions, eight at a time, over AsyncConnectionPools,
    then recovery (in its worker thread, borrowing through the loop)."""
    app = pool_app()

    async def scenario() -> tuple[list[Outcome], RecoveryReport, Xid, dict[Xid, Any], list[int]]:
        made = {
            name: AsyncConnectionPool(dsn, min_size=1, max_size=MAX_SIZE, open=False, timeout=30)
            for name, dsn in pool_dsns(settings, app).items()
        }
        for pool in made.values():
            await pool.open()
        try:
            resources = [AsyncPostgresResource(name, pool) for name, pool in made.items()]
            coordinator = AsyncCoordinator(
                "pooltest",
                FileDecisionLog(tmp_path / "decisions.log"),
                resources,
                housekeeping_interval=None,
            )
            await coordinator.start()
            eight = asyncio.Semaphore(8)

            async def one(i: int) -> Outcome:
                async with eight, coordinator.transaction() as tx:
                    await tx.execute("a", "INSERT INTO pool_probe VALUES (%s)", (i,))
                    await tx.execute("b", "INSERT INTO pool_probe VALUES (%s)", (i,))
                return tx.outcome  # type: ignore[return-value]

            try:
                outcomes = list(await asyncio.gather(*(one(i) for i in range(40))))
                xid = left_xid("asyncio")
                branch = await resources[0].begin(xid)
                await branch.execute("INSERT INTO pool_probe VALUES (-1)")
                await branch.prepare()
                await branch.conn.close()  # the session dies; the branch lives on
                await branch.release()
                report = await coordinator.recover(fence_timeout=5)
            finally:
                await coordinator.close()
            left = await resources[0].recover(FORMAT_ID, "pooltest.")
            return outcomes, report, xid, left, [p.get_stats()["pool_size"] for p in made.values()]
        finally:
            for pool in made.values():
                await pool.close()

    with SessionWatch(settings, app) as watch:
        outcomes, report, xid, left, sizes = asyncio.run(scenario())
    return outcomes, report, xid, left, watch, sizes


@pytest.mark.lab
@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_transactions_and_recovery_stay_within_the_applications_pool(
    settings: Settings, probe: str, tmp_path: Path, api: str
) -> None:
    """Forty transactions, eight at a time, a branch left prepared and recovered: A and B
    never see more sessions of the pool than its max_size, and every one commits (the
    sync API over a ConnectionPool, the asyncio one over an AsyncConnectionPool)."""
    run = run_threaded if api == "sync" else run_asyncio
    outcomes, report, xid, left, watch, sizes = run(settings, probe, tmp_path)
    assert outcomes == [Outcome.COMMITTED] * 40
    assert [i.gtrid for i in report.items] == [xid.gtrid]
    assert left == {}
    assert watch.samples > 10
    assert 1 <= watch.most["a"] <= MAX_SIZE and 1 <= watch.most["b"] <= MAX_SIZE
    assert all(size <= MAX_SIZE for size in sizes)


@pytest.mark.lab
def test_a_connection_factory_is_the_only_way_connections_are_opened(
    settings: Settings, probe: str
) -> None:
    """With a factory, every connection the resource uses (recovery's too) came from it."""
    made: list[psycopg.Connection[Any]] = []

    def factory() -> psycopg.Connection[Any]:
        conn = psycopg.connect(settings.pg_b)
        made.append(conn)
        return conn

    resource = PostgresResource("b", factory, pool_size=1)
    xid = Xid.branch(f"factory.{os.getpid()}", "b")
    branch = resource.begin(xid)
    branch.execute("INSERT INTO pool_probe VALUES (1)")
    branch.prepare()
    branch.commit_prepared()
    branch.release()
    assert resource.recover(FORMAT_ID, "factory.") == {}
    pids = [conn.info.backend_pid for conn in made if not conn.closed]
    assert len(made) == 2  # the branch's (kept idle) and recovery's
    assert sessions(settings.pg_b, pids) == 2
    resource.close()
    assert all(conn.closed for conn in made)


@pytest.mark.lab
def test_an_async_connection_factory_is_the_only_way_connections_are_opened(
    settings: Settings, probe: str
) -> None:
    """With an async factory, every connection the asyncio resource uses (recovery's too)
    came from it."""
    made: list[psycopg.AsyncConnection[Any]] = []

    async def factory() -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(settings.pg_b)
        made.append(conn)
        return conn

    async def scenario() -> tuple[dict[Xid, Any], list[int], list[bool]]:
        resource = AsyncPostgresResource("b", factory, pool_size=1)
        xid = Xid.branch(f"afactory.{os.getpid()}", "b")
        branch = await resource.begin(xid)
        await branch.execute("INSERT INTO pool_probe VALUES (1)")
        await branch.prepare()
        await branch.commit_prepared()
        await branch.release()
        left = await resource.recover(FORMAT_ID, "afactory.")
        pids = [conn.info.backend_pid for conn in made if not conn.closed]
        live = sessions(settings.pg_b, pids)
        await resource.close()
        return left, [len(made), live], [conn.closed for conn in made]

    left, (count, live), closed = asyncio.run(scenario())
    assert left == {}
    assert count == 2  # the branch's (kept idle) and recovery's
    assert live == 2
    assert all(closed)


def sessions(dsn: str, pids: list[int]) -> int:
    """How many of these backend pids are live sessions of the server."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("kind", [PostgresResource, AsyncPostgresResource])
def test_anything_else_is_refused_with_what_it_takes(kind: Any) -> None:
    """A source that is neither a string, a pool nor a callable is refused by name."""
    with pytest.raises(ConfigurationError, match="ConnectionPool or a connection factory"):
        kind("a", 42)


def test_a_pool_of_the_other_api_is_refused_by_name() -> None:
    """A ConnectionPool given to the asyncio resource, or an AsyncConnectionPool to the
    sync one, is refused when the resource is made, naming the pool it takes."""
    sync_pool = ConnectionPool("dbname=none", open=False)
    async_pool = AsyncConnectionPool("dbname=none", open=False)
    with pytest.raises(ConfigurationError, match=r"takes a psycopg_pool\.AsyncConnectionPool"):
        AsyncPostgresResource("a", sync_pool)
    with pytest.raises(ConfigurationError, match=r"takes a psycopg_pool\.ConnectionPool"):
        PostgresResource("a", async_pool)  # type: ignore[arg-type]
