"""A branch whose work ended its own transaction votes NO, through the public API (sync and
asyncio): nothing commits on one side only unless the outcome says so, nothing stays prepared."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from coordinator import Coordinator, FileDecisionLog, HeuristicMixed, Outcome
from coordinator.aio import AsyncCoordinator
from coordinator.errors import PrepareFailed
from coordinator.log.memory import MemoryDecisionLog
from participants.aio.fake import AsyncFakeResource
from participants.aio.postgres import AsyncPostgresResource
from participants.fake import FakeResource
from participants.postgres import PostgresResource
from scenarios.config import Settings
from tests.aio_portal import BlockingCoordinator, Portal

TABLE = "vote_ledger"
INSERT = f"INSERT INTO {TABLE} VALUES (%s, %s)"


def count(dsn: str, key: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id = %s", (key,)).fetchone()
        return int(row[0]) if row else 0


def prepared_gids(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {str(r[0]) for r in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()}


def remove_prepared(dsn: str, gid: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if gid in prepared_gids(dsn):
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


@pytest.fixture
def ledger(settings: Settings) -> str:
    """The table the tests write, in A and in B (made here if missing)."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text NOT NULL, amount int)")
    return TABLE


@pytest.fixture(params=["sync", "asyncio"])
def coordinator(request: pytest.FixtureRequest, ledger: str, tmp_path: Path) -> Iterator[Any]:
    """A coordinator over the lab's two databases: the sync one, or the asyncio one
    through a blocking portal (the same calls)."""
    settings: Settings = request.getfixturevalue("settings")
    cid = f"vote-{secrets.token_hex(3)}"
    log = FileDecisionLog(str(tmp_path / "decisions.log"))
    if request.param == "sync":
        resources = [PostgresResource("a", settings.pg_a), PostgresResource("b", settings.pg_b)]
        with Coordinator(cid, log, resources) as sync:
            yield sync
        return
    portal = Portal()
    aio = AsyncCoordinator(
        cid,
        log,
        [AsyncPostgresResource("a", settings.pg_a), AsyncPostgresResource("b", settings.pg_b)],
    )
    yield BlockingCoordinator(portal, aio)
    portal.run(aio.close())
    portal.close()


def assert_nothing_prepared(settings: Settings, *gtrids: str) -> None:
    """No branch of ``gtrids`` is prepared in A or B (a gid holds its gtrid in base64)."""
    for dsn in (settings.pg_a, settings.pg_b):
        left = {gtrid_of_gid(g) for g in prepared_gids(dsn)}
        assert not left & set(gtrids), left


def gtrid_of_gid(gid: str) -> str:
    """The gtrid in a PostgreSQL gid, as psycopg's ``tpc_recover`` reads it (recovery's
    own reading; a gid twopc did not write is its own gtrid)."""
    return str(psycopg.Xid.from_string(gid).gtrid)


@pytest.mark.lab
def test_rollback_in_a_branch_aborts_the_transaction(coordinator: Any, settings: Settings) -> None:
    """A then ROLLBACK in A, then B: the execute names the participant, gtrid and ROLLBACK,
    a later statement on A is refused without running, and the outcome is ABORTED with
    nothing in A or B."""
    tx = coordinator.begin()
    tx.execute("a", INSERT, (tx.gtrid, -1))
    with pytest.raises(PrepareFailed, match="ROLLBACK") as ended:
        tx.execute("a", "ROLLBACK")
    assert ended.value.participant == "a" and ended.value.gtrid == tx.gtrid
    with pytest.raises(PrepareFailed, match="ROLLBACK"):
        tx.execute("a", INSERT, (tx.gtrid, -2))  # psycopg would begin a new transaction
    tx.execute("b", INSERT, (tx.gtrid, 1))
    assert tx.commit() is Outcome.ABORTED
    assert "ROLLBACK" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_commit_in_a_branch_gives_a_heuristic_outcome_naming_it(
    coordinator: Any, settings: Settings
) -> None:
    """A then COMMIT in A, then a NO vote from B: the outcome is HEURISTIC_MIXED naming 'a'
    (its row is committed, B's is not), never a plain ABORTED; nothing stays prepared."""
    tx = coordinator.begin()
    tx.execute("a", INSERT, (tx.gtrid, -1))
    with pytest.raises(HeuristicMixed, match="COMMIT") as ended:
        tx.execute("a", "COMMIT")
    assert ended.value.participant == "a" and ended.value.gtrid == tx.gtrid
    with pytest.raises(psycopg.errors.NotNullViolation):
        tx.execute("b", f"INSERT INTO {TABLE} VALUES (NULL, 1)")  # B votes NO
    assert tx.commit() is Outcome.HEURISTIC_MIXED
    assert tx.heuristic == ("a",) and "participant 'a'" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_commit_in_a_branch_is_never_reported_committed(
    coordinator: Any, settings: Settings
) -> None:
    """A then COMMIT in A, then B's work succeeds: B is rolled back and the outcome is
    HEURISTIC_MIXED, not COMMITTED."""
    tx = coordinator.begin()
    tx.execute("a", INSERT, (tx.gtrid, -1))
    with pytest.raises(HeuristicMixed):
        tx.execute("a", "COMMIT")
    tx.execute("b", INSERT, (tx.gtrid, 1))
    assert tx.commit() is Outcome.HEURISTIC_MIXED
    assert count(settings.pg_b, tx.gtrid) == 0
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_prepare_transaction_in_a_branch_is_rolled_back(
    coordinator: Any, settings: Settings
) -> None:
    """PREPARE TRANSACTION 'x' as A's work: that prepared transaction is rolled back, the
    outcome is ABORTED, A and B hold nothing and pg_prepared_xacts holds neither gid."""
    foreign = f"vote-foreign-{secrets.token_hex(4)}"
    tx = coordinator.begin()
    tx.execute("a", INSERT, (tx.gtrid, -1))
    try:
        with pytest.raises(PrepareFailed, match=r"PREPARE TRANSACTION.*rolled back"):
            tx.execute("a", f"PREPARE TRANSACTION '{foreign}'")
        tx.execute("b", INSERT, (tx.gtrid, 1))
        assert tx.commit() is Outcome.ABORTED
        assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
        assert_nothing_prepared(settings, tx.gtrid, foreign)
    finally:
        remove_prepared(settings.pg_a, foreign)  # what a failed check would leave behind


@pytest.mark.lab
def test_the_block_raises_heuristic_mixed_when_a_branch_committed(
    settings: Settings, ledger: str
) -> None:
    """A transaction used as a `with` block whose work ran COMMIT (as END) and caught the
    error: leaving the block raises HeuristicMixed naming the participant and the gtrid."""
    resources = [PostgresResource("a", settings.pg_a), PostgresResource("b", settings.pg_b)]
    cid = f"vote-{secrets.token_hex(3)}"
    with Coordinator(cid, MemoryDecisionLog(), resources) as c:
        tx = c.begin()
        with pytest.raises(HeuristicMixed, match="heuristic outcome") as told, tx:
            tx.execute("a", INSERT, (tx.gtrid, -1))
            with pytest.raises(HeuristicMixed):
                tx.execute("a", "END")  # COMMIT by another name
            tx.execute("b", INSERT, (tx.gtrid, 1))
    assert told.value.participant == "a" and told.value.gtrid == tx.gtrid
    assert tx.outcome is Outcome.HEURISTIC_MIXED


@pytest.mark.lab
def test_the_async_block_rolls_back_with_a_heuristic_outcome(
    settings: Settings, ledger: str
) -> None:
    """`async with` whose work ran COMMIT and let the error out: the transaction rolled
    back with the outcome HEURISTIC_MIXED naming 'a', and B holds nothing."""

    async def scenario() -> Any:
        resources = [
            AsyncPostgresResource("a", settings.pg_a),
            AsyncPostgresResource("b", settings.pg_b),
        ]
        cid = f"vote-{secrets.token_hex(3)}"
        async with AsyncCoordinator(cid, MemoryDecisionLog(), resources) as c:
            with pytest.raises(HeuristicMixed, match="COMMIT"):
                async with c.transaction() as tx:
                    await tx.execute("b", INSERT, (tx.gtrid, 1))
                    await tx.execute("a", INSERT, (tx.gtrid, -1))
                    await tx.execute("a", "COMMIT")
        return tx

    tx = asyncio.run(scenario())
    assert tx.outcome is Outcome.HEURISTIC_MIXED and tx.heuristic == ("a",)
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 0)


# -- the driver's rule, on the fakes -------------------------------------------------------


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_a_branch_failed_with_heuristic_mixed_makes_the_outcome_heuristic(api: str) -> None:
    """The driver turns an abort whose branch failed with HeuristicMixed into
    HEURISTIC_MIXED naming that participant, counted apart from aborts; the other branches
    are rolled back."""
    a, b = FakeResource("a"), FakeResource("b")
    if api == "sync":
        coordinator: Any = Coordinator("vote-fake", MemoryDecisionLog(), [a, b])
        portal = None
    else:
        portal = Portal()
        aio = AsyncCoordinator(
            "vote-fake", MemoryDecisionLog(), [AsyncFakeResource(a), AsyncFakeResource(b)]
        )
        coordinator = BlockingCoordinator(portal, aio)
    try:
        tx = coordinator.begin()
        tx.execute("a", "a-op")
        tx.execute("b", "b-op")
        tx.branch("a").failure = HeuristicMixed("COMMIT in the branch", participant="a")
        assert tx.commit() is Outcome.HEURISTIC_MIXED
        assert tx.heuristic == ("a",) and "participant 'a'" in tx.reason
        assert tx.gtrid in b.store.rolled_back and not b.store.committed
        stats = coordinator.stats()
        assert (stats["heuristic_mixed"], stats["aborted"]) == (1, 0)
    finally:
        if portal is None:
            coordinator.close()
        else:
            portal.run(aio.close())
            portal.close()
