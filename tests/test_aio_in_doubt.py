"""The asyncio coordinator with its decisions in PostgreSQL (docs/design.md §3): a commit of
the decision row that gets no answer is resolved by the backlog, without a restart."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from coordinator import failpoints
from coordinator.aio import AsyncCoordinator
from coordinator.errors import TransactionInDoubt
from coordinator.log.table import TableDecisionLog
from coordinator.states import Outcome
from participants.aio.postgres import AsyncPostgresResource
from participants.decision_table import PostgresDecisionTable
from participants.membership import PostgresMembership
from participants.postgres import PostgresResource
from scenarios.config import Settings
from scenarios.lab.proxy import FaultProxy
from tests.test_peers import decision_rows, prepared_gtrids, unique_id

pytestmark = pytest.mark.lab

PROBE = "CREATE TABLE IF NOT EXISTS aio_in_doubt_probe (tag text)"


def tags(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT tag FROM aio_in_doubt_probe").fetchall()}


@pytest.fixture
def a_through_proxy(settings: Settings) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of database A, and a DSN of A through it."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(PROBE)
    info = psycopg.conninfo.conninfo_to_dict(settings.pg_a)
    with FaultProxy(f"{info['host']}:{info['port']}", name="pg-a") as proxy:
        yield (
            proxy,
            psycopg.conninfo.make_conninfo(
                settings.pg_a, host="127.0.0.1", port=proxy.port, connect_timeout=2
            ),
        )
        proxy.heal(reset=True)


def cut_once_the_row_is_committed(proxy: FaultProxy, dsn: str, gtrid: str) -> None:
    """The carrier's answers are held back (a slow link); once its commit is visible
    directly on the server, its connection is reset: committed, and no answer came."""
    proxy.delay(5.0)

    def watch() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not conn.execute(
                "SELECT 1 FROM twopc_decisions WHERE gtrid = %s", (gtrid,)
            ).fetchone():
                time.sleep(0.02)
        proxy.reset()
        proxy.delay(0)

    threading.Thread(target=watch, name="cut-after-commit", daemon=True).start()


@pytest.mark.parametrize("committed", [False, True], ids=["lost-before", "lost-after"])
def test_an_unanswered_decision_row_commit_is_resolved_by_the_backlog_without_a_restart(
    settings: Settings, a_through_proxy: tuple[FaultProxy, str], committed: bool
) -> None:
    """TWOPC_DECISIONS=postgres on asyncio: the carrier's COMMIT gets no answer (its
    connection reset before it went out, or after it committed): IN_DOUBT for the caller,
    then the running coordinator's backlog settles it and decides by the row."""
    proxy, via_proxy = a_through_proxy
    ident = unique_id("aio-row")
    home = PostgresResource("a", settings.pg_a)  # the table and the locks, not through the proxy
    table = PostgresDecisionTable(home)
    table.create()
    membership = PostgresMembership(ident, home, [home, PostgresResource("b", settings.pg_b)])
    coordinator = AsyncCoordinator(
        ident,
        TableDecisionLog(table, end_batch=1),
        [AsyncPostgresResource("a", via_proxy), AsyncPostgresResource("b", settings.pg_b)],
        housekeeping_interval=0.1,
        membership=membership,
        decision_holder=table,
        peer_interval=None,
    )
    tag = f"{ident}-{committed}"

    def cut() -> None:
        if committed:
            cut_once_the_row_is_committed(proxy, settings.pg_a, gtrid)
        else:
            proxy.reset()

    async def scenario() -> list[str]:
        async with coordinator:
            tx = coordinator.begin()
            nonlocal gtrid
            gtrid = tx.gtrid
            failpoints.arm("before_decision_row_commit", cut)
            with pytest.raises(TransactionInDoubt):
                async with tx:
                    for name in ("a", "b"):
                        await tx.execute(name, "INSERT INTO aio_in_doubt_probe VALUES (%s)", (tag,))
            assert tx.outcome is Outcome.IN_DOUBT
            assert coordinator.in_doubt == [gtrid]
            deadline = time.monotonic() + 60
            while coordinator.in_doubt and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the watchdog's backlog rounds, every 0.1 s
            return coordinator.in_doubt

    gtrid = ""
    try:
        assert asyncio.run(scenario()) == []
    finally:
        failpoints.disarm()
    assert prepared_gtrids(settings.pg_b, f"{ident}.") == set()
    assert (tag in tags(settings.pg_a)) is committed
    assert (tag in tags(settings.pg_b)) is committed
    assert decision_rows(settings.pg_a, f"{ident}.") == set()  # END deleted the row
