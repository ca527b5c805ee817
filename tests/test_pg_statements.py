"""A statement deferred often is prepared on the server, once per connection, as psycopg
prepares its own (sync and asyncio): after the connection's ``prepare_threshold`` uses, never
when it is None or the connection is the application pool's; a name the server no longer knows
is a NO vote, once, and the statement is prepared again."""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from coordinator import Coordinator, FileDecisionLog, Outcome
from coordinator.aio import AsyncCoordinator
from participants.aio.postgres import AsyncPostgresResource
from participants.pg_statements import NAME_PREFIX, Prepared
from participants.postgres import PostgresResource
from scenarios.config import Settings
from tests.aio_portal import BlockingCoordinator, Portal
from tests.test_vote import INSERT, assert_nothing_prepared, count
from tests.test_vote import ledger as ledger

KEY = (b"INSERT INTO t VALUES ($1)", (21,))
OTHER = (b"INSERT INTO t VALUES ($1)", (20,))


def test_a_statement_is_prepared_at_the_use_after_the_threshold() -> None:
    """With threshold 2, the first two uses go unnamed, the third parses a name, and every
    later use executes by that name."""
    prepared = Prepared(threshold=2, limit=100)
    assert [prepared.name_for(KEY) for _ in range(2)] == [(None, False), (None, False)]
    name, parse = prepared.name_for(KEY)
    assert name is not None and name.startswith(NAME_PREFIX) and parse
    assert prepared.name_for(KEY) == (name, False)
    assert len(prepared) == 1


def test_threshold_zero_prepares_at_the_first_use_and_types_make_another_statement() -> None:
    """With threshold 0 the first use parses; the same text with other parameter types is
    another statement, under another name."""
    prepared = Prepared(threshold=0, limit=100)
    first, other = prepared.name_for(KEY), prepared.name_for(OTHER)
    assert first[1] and other[1] and first[0] != other[0]


def test_no_more_than_the_limit_are_prepared() -> None:
    """At the limit, a new statement goes unnamed; the ones prepared keep their names."""
    prepared = Prepared(threshold=0, limit=1)
    name, _ = prepared.name_for(KEY)
    assert prepared.name_for(OTHER) == (None, False)
    assert prepared.name_for(KEY) == (name, False)


def test_a_failed_parse_and_forget_prepare_again_under_a_new_name() -> None:
    """A Parse that did not succeed drops its name, and forget() drops them all: the next
    use parses again, under a name not used before."""
    prepared = Prepared(threshold=0, limit=100)
    first, _ = prepared.name_for(KEY)
    prepared.failed(KEY)
    second, parse = prepared.name_for(KEY)
    assert parse and second != first
    prepared.forget()
    third, parse = prepared.name_for(KEY)
    assert parse and third not in (first, second) and len(prepared) == 1


def test_the_use_counts_are_bounded() -> None:
    """The uses counted for statements not prepared yet never exceed the limit."""
    prepared = Prepared(threshold=5, limit=3)
    for n in range(50):
        prepared.name_for((b"SELECT %d" % n, ()))
    assert len(prepared._uses) <= 3


Factory = Callable[..., Any]


@pytest.fixture(params=["sync", "asyncio"])
def make(request: pytest.FixtureRequest, ledger: str, tmp_path: Path) -> Iterator[Factory]:
    """Makes a coordinator over A and B whose resources take the keywords given (the sync
    one, or the asyncio one through a blocking portal); closes them all at the end."""
    settings: Settings = request.getfixturevalue("settings")
    closing: list[Callable[[], None]] = []

    def coordinator(**kwargs: Any) -> Any:
        cid = f"stmt-{secrets.token_hex(3)}"
        log = FileDecisionLog(str(tmp_path / f"{cid}.log"))
        if request.param == "sync":
            resources = [
                PostgresResource("a", settings.pg_a, **kwargs),
                PostgresResource("b", settings.pg_b, **kwargs),
            ]
            sync = Coordinator(cid, log, resources)
            closing.append(sync.close)
            return sync
        portal = Portal()
        aio = AsyncCoordinator(
            cid,
            log,
            [
                AsyncPostgresResource("a", settings.pg_a, **kwargs),
                AsyncPostgresResource("b", settings.pg_b, **kwargs),
            ],
        )
        closing.append(portal.close)
        closing.append(lambda: portal.run(aio.close()))
        return BlockingCoordinator(portal, aio)

    yield coordinator
    for close in reversed(closing):
        close()


def _on_conn(coordinator: Any, branch: Any, query: str) -> list[tuple[Any, ...]]:
    """The rows of ``query`` run on the branch's own connection (awaited under asyncio)."""
    result = branch.conn.execute(query)
    if not inspect.isawaitable(result):
        return list(result.fetchall())

    async def fetch() -> Any:
        return await (await result).fetchall()

    return list(coordinator._portal.run(fetch()))


#: The statements the branches prepared on a session.
OURS = (
    "SELECT statement FROM pg_prepared_statements "
    f"WHERE name LIKE '{NAME_PREFIX.decode().replace('_', chr(92) + '_')}%'"
)


def _transfers(coordinator: Any, settings: Settings, times: int) -> list[str]:
    """``times`` transactions, each deferring one row into A and into B; all commit."""
    gtrids = []
    for n in range(times):
        tx = coordinator.begin()
        tx.branch("a").defer(INSERT, (tx.gtrid, n))
        tx.branch("b").defer(INSERT, (tx.gtrid, n))
        assert tx.commit() is Outcome.COMMITTED, tx.reason
        gtrids.append(tx.gtrid)
    assert [count(settings.pg_a, g) + count(settings.pg_b, g) for g in gtrids] == [2] * times
    assert_nothing_prepared(settings, *gtrids)
    return gtrids


def _prepared_statements(coordinator: Any) -> list[str]:
    """The statements the branches prepared on A's and B's (one kept) sessions."""
    tx = coordinator.begin()
    rows = _on_conn(coordinator, tx.branch("a"), OURS) + _on_conn(coordinator, tx.branch("b"), OURS)
    tx.rollback()
    return [row[0] for row in rows]


@pytest.mark.lab
def test_a_statement_deferred_often_is_prepared_once_per_session(
    make: Factory, settings: Settings
) -> None:
    """Eight transactions deferring the same INSERT (psycopg's threshold, 5): each session
    holds it prepared once, with $n placeholders, and every transaction committed."""
    coordinator = make()
    _transfers(coordinator, settings, 8)
    statements = _prepared_statements(coordinator)
    assert len(statements) == 2 and all("VALUES ($1, $2)" in s for s in statements), statements


@pytest.mark.lab
def test_a_threshold_of_none_prepares_nothing(make: Factory, settings: Settings) -> None:
    """prepare_threshold=None: the same eight transactions commit and nothing is prepared."""
    coordinator = make(prepare_threshold=None)
    _transfers(coordinator, settings, 8)
    assert _prepared_statements(coordinator) == []


@pytest.mark.lab
def test_statements_dropped_by_the_work_are_a_no_vote_once_then_prepared_again(
    make: Factory, settings: Settings
) -> None:
    """Work that runs DEALLOCATE ALL drops A's prepared INSERT: the next transaction deferring
    it votes NO naming 'a' and the missing statement, nothing of it commits, and the one after
    prepares it again and commits."""
    coordinator = make(prepare_threshold=0)
    _transfers(coordinator, settings, 1)
    tx = coordinator.begin()
    tx.execute("a", "DEALLOCATE ALL")
    assert tx.commit() is Outcome.COMMITTED, tx.reason  # nothing to prepare: read-only
    tx = coordinator.begin()
    tx.branch("a").defer(INSERT, (tx.gtrid, 1))
    tx.branch("b").defer(INSERT, (tx.gtrid, 1))
    assert tx.commit() is Outcome.ABORTED
    assert "'a'" in tx.reason and "does not exist" in tx.reason, tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)
    _transfers(coordinator, settings, 1)
    assert len(_prepared_statements(coordinator)) == 2


@pytest.mark.lab
def test_the_application_pools_connections_prepare_nothing(
    ledger: str, settings: Settings, tmp_path: Path
) -> None:
    """Resources over the application's psycopg_pool (whose reset the resource would not
    see) prepare nothing, even at threshold 0; their transactions commit."""
    pools = [
        ConnectionPool(dsn, min_size=1, max_size=2, kwargs={"prepare_threshold": 0}, open=True)
        for dsn in (settings.pg_a, settings.pg_b)
    ]
    resources = [PostgresResource("a", pools[0]), PostgresResource("b", pools[1])]
    try:
        with Coordinator(
            f"stmt-{secrets.token_hex(3)}", FileDecisionLog(str(tmp_path / "d.log")), resources
        ) as coordinator:
            _transfers(coordinator, settings, 3)
        for pool in pools:
            with pool.connection() as conn:
                assert conn.execute(OURS).fetchall() == []
    finally:
        for pool in pools:
            pool.close()


@pytest.mark.lab
def test_a_failed_parse_leaves_nothing_prepared_and_the_next_use_prepares(
    make: Factory, settings: Settings
) -> None:
    """A's first statement fails, so the Parse of the INSERT deferred after it is skipped:
    the transaction aborts, and the next transaction prepares and commits the INSERT."""
    coordinator = make(prepare_threshold=0)
    tx = coordinator.begin()
    tx.branch("a").defer("INSERT INTO vote_ledger VALUES (NULL, 1)")  # NOT NULL id
    tx.branch("a").defer(INSERT, (tx.gtrid, 1))
    assert tx.commit() is Outcome.ABORTED
    assert "'a'" in tx.reason and "null value" in tx.reason, tx.reason
    _transfers(coordinator, settings, 2)
    assert len(_prepared_statements(coordinator)) == 3  # A: the failing one's Parse ran too
