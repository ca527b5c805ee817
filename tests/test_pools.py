"""PostgresResource over the application's psycopg_pool.ConnectionPool, or a connection
factory: transactions, recovery and in-doubt handling use only the connections given."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from coordinator.coordinator import Coordinator
from coordinator.errors import ConfigurationError
from coordinator.log.file import FileDecisionLog
from coordinator.states import Outcome
from coordinator.xid import FORMAT_ID, Xid
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


@pytest.fixture
def pools(settings: Settings) -> Iterator[tuple[str, dict[str, ConnectionPool[Any]]]]:
    """A ConnectionPool (max_size 2) per database, its sessions named for this test."""
    app = f"twopc-pool-{os.getpid()}-{time.monotonic_ns()}"
    made = {
        # The name is in the connection string itself: a connection the resource opened
        # from pool.conninfo behind the pool's back would be counted too.
        name: ConnectionPool(
            f"{dsn} application_name={app}", min_size=1, max_size=MAX_SIZE, open=True, timeout=30
        )
        for name, dsn in (("a", settings.pg_a), ("b", settings.pg_b))
    }
    yield app, made
    for pool in made.values():
        pool.close()


@pytest.mark.lab
def test_transactions_and_recovery_stay_within_the_applications_pool(
    settings: Settings,
    probe: str,
    pools: tuple[str, dict[str, ConnectionPool[Any]]],
    tmp_path: Path,
) -> None:
    """Forty transactions from eight threads, a branch left prepared and recovered: A and B
    never see more sessions of the pool than its max_size, and every one commits."""
    app, made = pools
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

    with SessionWatch(settings, app) as watch:
        try:
            with ThreadPoolExecutor(8) as workers:
                outcomes = list(workers.map(one, range(40)))
            # A branch prepared by hand and left: recovery lists and resolves it from the pool.
            xid = Xid.branch(f"pooltest.left-{os.getpid()}", "a")
            branch = resources[0].begin(xid)
            branch.execute("INSERT INTO pool_probe VALUES (-1)")
            branch.prepare()
            branch.conn.close()  # the session dies; the branch lives on in the server
            branch.release()
            report = coordinator.recover(fence_timeout=5)
        finally:
            coordinator.close()
    assert outcomes == [Outcome.COMMITTED] * 40
    assert [i.gtrid for i in report.items] == [xid.gtrid]
    assert resources[0].recover(FORMAT_ID, "pooltest.") == {}
    assert watch.samples > 10
    assert 1 <= watch.most["a"] <= MAX_SIZE and 1 <= watch.most["b"] <= MAX_SIZE
    for pool in made.values():
        assert pool.get_stats()["pool_size"] <= MAX_SIZE


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
    pids = set()
    with psycopg.connect(settings.pg_b, autocommit=True) as admin:
        for conn in made:
            if not conn.closed:
                pids.add(conn.info.backend_pid)
        mine = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)
        ).fetchone()
    assert len(made) == 2  # the branch's (kept idle) and recovery's
    assert mine == (2,)
    resource.close()
    assert all(conn.closed for conn in made)


def test_anything_else_is_refused_with_what_it_takes() -> None:
    """A source that is neither a string, a pool nor a callable is refused by name."""
    with pytest.raises(ConfigurationError, match="ConnectionPool or a connection factory"):
        PostgresResource("a", 42)  # type: ignore[arg-type]
