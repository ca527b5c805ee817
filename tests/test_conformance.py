"""One conformance suite for the participant contract, run against the fake and the real ones."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from coordinator.errors import (
    CommitRefused,
    HeuristicMixed,
    InvalidTransition,
    ParticipantError,
    PrepareFailed,
)
from coordinator.protocol import LastResource, XAResource
from coordinator.states import Vote
from coordinator.xid import FORMAT_ID, Xid
from participants.aio.fake import AsyncFakeBroker, AsyncFakeResource
from participants.aio.postgres import AsyncPostgresResource
from participants.fake import FakeBroker, FakeResource
from participants.pg_commands import gid_of
from participants.postgres import PostgresResource
from participants.stomp_headers import InvalidHeader
from scenarios.config import Settings
from tests.aio_portal import Blocking, Portal
from tests.broker_queues import fresh_queue


class XAHarness(Protocol):
    """How the suite writes through a branch and reads what became visible."""

    resource: XAResource

    def write(self, branch: Any, key: str) -> None: ...

    def fail(self, branch: Any) -> None: ...

    def visible(self, key: str) -> bool: ...


@dataclass
class FakeHarness:
    resource: FakeResource

    def write(self, branch: Any, key: str) -> None:
        branch.execute(key)

    def fail(self, branch: Any) -> None:
        branch.failure = RuntimeError("the work failed")

    def visible(self, key: str) -> bool:
        return any(key in ops for ops in self.resource.store.committed.values())


@dataclass
class PostgresHarness:
    resource: PostgresResource

    def write(self, branch: Any, key: str) -> None:
        branch.execute("INSERT INTO conformance (k) VALUES (%s)", (key,))

    def fail(self, branch: Any) -> None:
        with pytest.raises(psycopg.errors.DivisionByZero):
            branch.execute("SELECT 1 / 0")

    def visible(self, key: str) -> bool:
        with psycopg.connect(self.resource.dsn) as conn:
            return (
                conn.execute("SELECT 1 FROM conformance WHERE k = %s", (key,)).fetchone()
                is not None
            )

    def on_connection(self, branch: Any, statement: str) -> None:
        """Run ``statement`` on the branch's connection itself, around ``execute``."""
        branch.conn.execute(statement)


@dataclass
class BlockingHarness:
    """An asyncio resource's harness: the suite's sync calls go through a portal."""

    inner: Any
    resource: Any
    portal: Portal

    def write(self, branch: Any, key: str) -> None:
        self.inner.write(branch, key)

    def fail(self, branch: Any) -> None:
        self.inner.fail(branch)

    def visible(self, key: str) -> bool:
        return bool(self.inner.visible(key))

    def on_connection(self, branch: Any, statement: str) -> None:
        self.portal.run(branch.conn.execute(statement))


#: The PostgreSQL participants: sync and asyncio, over a connection string and over the
#: application's pool (psycopg_pool.ConnectionPool / AsyncConnectionPool).
POSTGRES_PARAMS = [
    pytest.param(kind, marks=pytest.mark.lab)
    for kind in ("postgres", "postgres-asyncio", "postgres-pool", "postgres-asyncio-pool")
]


@pytest.fixture(
    params=[
        "fake",
        "fake-asyncio",
        *POSTGRES_PARAMS,
    ]
)
def xa(request: pytest.FixtureRequest) -> Iterator[XAHarness]:
    yield from harness_for(request)


@pytest.fixture(params=POSTGRES_PARAMS)
def pg(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Every PostgreSQL participant (sync and asyncio), for the checks of what SQL did."""
    yield from harness_for(request)


#: The size of the application's pool in the pool variants: two branches at once and
#: the recovery calls' borrowed connection fit.
POOL_SIZE = 4


def harness_for(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The harness for ``request.param``: a fake or PostgreSQL, sync or asyncio, over a
    connection string or the application's pool."""
    pooled = request.param.endswith("-pool")
    kind = request.param.removesuffix("-pool")
    if kind.startswith("fake"):
        harness: Any = FakeHarness(FakeResource("a"))
    else:
        settings: Settings = request.getfixturevalue("settings")
        with psycopg.connect(settings.pg_a, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS conformance (k text PRIMARY KEY)")
        harness = PostgresHarness(PostgresResource("a", settings.pg_a))
    if not kind.endswith("asyncio"):
        if not pooled:
            yield harness
            harness.resource.close()
            return
        with ConnectionPool(harness.resource.dsn, max_size=POOL_SIZE) as pool:
            yield PostgresHarness(PostgresResource("a", pool))
        return
    # The same checks on the asyncio resource: every call of the resource and of its
    # branches (recover and the by-xid calls included) is awaited through the portal.
    portal = Portal()
    async_pool: AsyncConnectionPool[Any] | None = None
    if isinstance(harness, FakeHarness):
        aio: Any = AsyncFakeResource(harness.resource)
        recovery = aio.recovery_resource()
        resource = Blocking(portal, aio)
        resource.recover = recovery.recover
        resource.commit_recovered = recovery.commit_recovered
        resource.rollback_recovered = recovery.rollback_recovered
    elif pooled:
        async_pool = AsyncConnectionPool(harness.resource.dsn, max_size=POOL_SIZE, open=False)
        portal.run(async_pool.open())
        resource = Blocking(portal, AsyncPostgresResource("a", async_pool))
    else:
        resource = Blocking(portal, AsyncPostgresResource("a", harness.resource.dsn))
    yield BlockingHarness(harness, resource, portal)
    portal.run(resource._target.close())
    if async_pool is not None:
        portal.run(async_pool.close())
    portal.close()


@given(
    gtrid=st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
    bqual=st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
)
def test_the_branch_gid_is_psycopgs_encoding_of_the_xid(gtrid: str, bqual: str) -> None:
    """gid_of(xid) is what psycopg (and tpc_recover) make of the same Xid, for any valid ids."""
    xid = Xid(FORMAT_ID, gtrid, bqual)
    gid = gid_of(xid)
    assert gid == str(psycopg.Xid(FORMAT_ID, gtrid, bqual))
    parsed = psycopg.Xid.from_string(gid)
    assert (parsed.format_id, parsed.gtrid, parsed.bqual) == (FORMAT_ID, gtrid, bqual)


def new_xid() -> Xid:
    return Xid.branch(f"conf.{secrets.token_hex(8)}", "a")


def prepared(resource: XAResource) -> set[Xid]:
    return set(resource.recover(FORMAT_ID, "conf."))


def test_prepare_then_commit_prepared_makes_the_write_visible(xa: XAHarness) -> None:
    """begin -> write -> prepare (YES, listed by recover) -> commit_prepared (visible, unlisted)."""
    xid = new_xid()
    branch = xa.resource.begin(xid)
    xa.write(branch, xid.gtrid)
    assert branch.read_only() is False
    assert branch.prepare() is Vote.YES
    assert xid in prepared(xa.resource)
    assert not xa.visible(xid.gtrid)
    branch.commit_prepared()
    branch.release()
    assert xid not in prepared(xa.resource)
    assert xa.visible(xid.gtrid)


def test_sent_ahead_prepare_and_commit_give_the_same_result(xa: XAHarness) -> None:
    """send_prepare then prepare, send_commit_prepared then commit_prepared: as the plain calls."""
    first, second = new_xid(), new_xid()
    branches = [xa.resource.begin(first), xa.resource.begin(second)]
    for branch in branches:
        xa.write(branch, branch.xid.gtrid)
    for branch in branches:
        branch.send_prepare()
    assert [branch.prepare() for branch in branches] == [Vote.YES, Vote.YES]
    assert {first, second} <= prepared(xa.resource)
    for branch in branches:
        branch.send_commit_prepared()
    for branch in branches:
        branch.commit_prepared()
        branch.release()
    assert not {first, second} & prepared(xa.resource)
    assert xa.visible(first.gtrid) and xa.visible(second.gtrid)


def test_rollback_with_a_prepare_sent_and_not_read_leaves_nothing(xa: XAHarness) -> None:
    """A PREPARE sent ahead whose vote was never read is rolled back by rollback()."""
    xid = new_xid()
    branch = xa.resource.begin(xid)
    xa.write(branch, xid.gtrid)
    branch.send_prepare()
    branch.rollback()
    branch.release()
    assert xid not in prepared(xa.resource)
    assert not xa.visible(xid.gtrid)


def test_prepared_branch_rolls_back(xa: XAHarness) -> None:
    """A prepared branch rolled back leaves nothing visible and nothing prepared."""
    xid = new_xid()
    branch = xa.resource.begin(xid)
    xa.write(branch, xid.gtrid)
    branch.prepare()
    branch.rollback()
    branch.release()
    assert xid not in prepared(xa.resource)
    assert not xa.visible(xid.gtrid)


def test_recovered_branch_is_resolved_by_xid_alone(xa: XAHarness) -> None:
    """commit_recovered / rollback_recovered work from the xid; a second call says 'gone'."""
    committed, rolled_back = new_xid(), new_xid()
    for xid in (committed, rolled_back):
        branch = xa.resource.begin(xid)
        xa.write(branch, xid.gtrid)
        branch.prepare()
        branch.release()  # the session goes; the prepared branch stays
    assert {committed, rolled_back} <= prepared(xa.resource)
    assert xa.resource.commit_recovered(committed) is True
    assert xa.resource.rollback_recovered(rolled_back) is True
    assert xa.resource.commit_recovered(committed) is False
    assert xa.resource.rollback_recovered(rolled_back) is False
    assert xa.visible(committed.gtrid) and not xa.visible(rolled_back.gtrid)


def test_branch_without_writes_is_read_only_and_commits_one_phase(xa: XAHarness) -> None:
    """A branch that wrote nothing reports read_only() and commits without prepare."""
    xid = new_xid()
    branch = xa.resource.begin(xid)
    assert branch.read_only() is True
    branch.commit_one_phase()
    branch.release()
    assert xid not in prepared(xa.resource)


def test_failed_work_votes_no_and_leaves_nothing(xa: XAHarness) -> None:
    """A branch whose work failed raises PrepareFailed and is rolled back."""
    xid = new_xid()
    branch = xa.resource.begin(xid)
    xa.write(branch, xid.gtrid)
    xa.fail(branch)
    with pytest.raises(PrepareFailed, match="participant 'a'"):
        branch.prepare()
    branch.release()
    assert xid not in prepared(xa.resource)
    assert not xa.visible(xid.gtrid)


def test_one_phase_commit_of_a_writer(xa: XAHarness) -> None:
    """A single writer commits one-phase: visible, never prepared."""
    xid = new_xid()
    branch = xa.resource.begin(xid)
    xa.write(branch, xid.gtrid)
    branch.commit_one_phase()
    branch.release()
    assert xa.visible(xid.gtrid) and xid not in prepared(xa.resource)


# -- the last resource --------------------------------------------------------------


@pytest.fixture(
    params=[
        "fake",
        "fake-asyncio",
        pytest.param("activemq", marks=pytest.mark.lab),
        pytest.param("activemq-asyncio", marks=pytest.mark.lab),
    ]
)
def broker(request: pytest.FixtureRequest) -> Iterator[LastResource]:
    if request.param.startswith("fake"):
        fake = FakeBroker("mq")
        if request.param == "fake":
            yield fake
            return
        yield from blocking_broker(AsyncFakeBroker(fake))
        return
    from participants.activemq import ActiveMQ
    from participants.aio.activemq import AsyncActiveMQ

    settings: Settings = request.getfixturevalue("settings")
    queue = fresh_queue("conformance.markers")
    kind = AsyncActiveMQ if request.param.endswith("asyncio") else ActiveMQ
    resource = kind(
        settings.stomp,
        f"conf-{secrets.token_hex(3)}",
        pool_size=2,
        marker_queue=queue,
        **settings.stomp_options(),
    )
    if isinstance(resource, ActiveMQ):
        yield resource
        resource.close()
        return
    yield from blocking_broker(resource)


def blocking_broker(aio: Any) -> Iterator[Any]:
    """An asyncio broker for the same checks: sessions through the portal, and the
    recovery calls (fence, markers, remove_markers) on its recovery view, in a worker
    thread while the loop runs (as the AsyncCoordinator calls them)."""
    portal = Portal()

    async def view() -> Any:
        return aio.recovery_broker()

    recovery = portal.run(view())
    broker = Blocking(portal, aio)
    for name in ("fence", "markers", "remove_markers"):
        call = getattr(recovery, name)
        setattr(broker, name, lambda *a, call=call: portal.run(asyncio.to_thread(call, *a)))
    yield broker
    portal.run(aio.close())
    portal.close()


def test_commit_with_marker_leaves_a_marker_until_removed(broker: LastResource) -> None:
    """The commit point: the marker is on the marker queue until remove_markers takes it."""
    gtrid = f"conf.{secrets.token_hex(6)}"
    session = broker.begin(gtrid)
    assert session.has_work is False
    session.send(fresh_queue("conformance"), "{}", {"k": "v"})
    assert session.has_work is True
    session.commit_with_marker(gtrid, 5.0)
    session.release()
    assert gtrid in broker.markers()
    assert broker.remove_markers([gtrid]) == 1
    assert gtrid not in broker.markers()


def test_a_refused_header_fails_only_its_own_send(broker: LastResource) -> None:
    """send() refuses a header the protocol owns at once; the session still commits the rest."""
    gtrid = f"conf.{secrets.token_hex(6)}"
    destination = fresh_queue("conformance")
    session = broker.begin(gtrid)
    session.send(destination, "{}", {"k": "v"})
    with pytest.raises(InvalidHeader, match=f"'expires' refused: .*gtrid {gtrid}"):
        session.send(destination, "{}", {"expires": "1"})
    session.commit_with_marker(gtrid, 5.0)
    session.release()
    assert gtrid in broker.markers()


def test_abort_leaves_no_marker(broker: LastResource) -> None:
    """An aborted broker transaction leaves no marker."""
    gtrid = f"conf.{secrets.token_hex(6)}"
    session = broker.begin(gtrid)
    session.send(fresh_queue("conformance"), "{}", None)
    session.abort()
    session.release()
    assert gtrid not in broker.markers()


def test_fence_succeeds_when_no_other_process_holds_the_sessions(broker: LastResource) -> None:
    """Fencing our own idle sessions succeeds, and the broker is usable afterwards."""
    broker.fence(10.0)
    gtrid = f"conf.{secrets.token_hex(6)}"
    session = broker.begin(gtrid)
    session.send(fresh_queue("conformance"), "{}", None)
    session.commit_with_marker(gtrid, 5.0)
    session.release()
    assert gtrid in broker.markers()


# -- PostgreSQL: work that ends its own branch, and the answers to PREPARE and COMMIT ------


def server_prepared(pg: Any) -> set[str]:
    """Every gid in pg_prepared_xacts, ours or not."""
    with psycopg.connect(pg.resource.dsn, autocommit=True) as conn:
        return {str(r[0]) for r in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()}


def remove_prepared(pg: Any, gid: str) -> None:
    """ROLLBACK PREPARED ``gid`` if the server holds it."""
    with psycopg.connect(pg.resource.dsn, autocommit=True) as conn:
        if gid in server_prepared(pg):
            conn.execute(psycopg.sql.SQL("ROLLBACK PREPARED {}").format(psycopg.sql.Literal(gid)))


def test_rollback_in_the_work_breaks_the_branch(pg: Any) -> None:
    """ROLLBACK as work: execute raises PrepareFailed naming the participant, the gtrid and
    ROLLBACK; later statements are refused unrun; prepare votes NO; nothing is left."""
    xid = new_xid()
    branch = pg.resource.begin(xid)
    pg.write(branch, xid.gtrid)
    with pytest.raises(PrepareFailed, match=f"ROLLBACK.*participant 'a', gtrid {xid.gtrid}"):
        branch.execute("ROLLBACK")
    with pytest.raises(PrepareFailed, match="ROLLBACK"):
        pg.write(branch, xid.gtrid)  # would run in a new transaction of psycopg's
    assert isinstance(branch.failure, PrepareFailed) and branch.read_only() is False
    with pytest.raises(PrepareFailed):
        branch.prepare()
    branch.release()
    assert xid not in prepared(pg.resource) and not pg.visible(xid.gtrid)


@pytest.mark.parametrize("statement", ["COMMIT", "END", "COMMIT AND CHAIN", "SELECT 1; COMMIT"])
def test_commit_in_the_work_is_heuristic_mixed(pg: Any, statement: str) -> None:
    """COMMIT (or END, COMMIT AND CHAIN, or COMMIT after another statement in one string)
    as work: execute raises HeuristicMixed naming the participant and the gtrid; prepare
    votes NO; the work is committed, not prepared."""
    xid = new_xid()
    branch = pg.resource.begin(xid)
    pg.write(branch, xid.gtrid)
    with pytest.raises(HeuristicMixed, match="COMMIT") as ended:
        branch.execute(statement)
    assert (ended.value.participant, ended.value.gtrid) == ("a", xid.gtrid)
    assert isinstance(branch.failure, HeuristicMixed)
    with pytest.raises(PrepareFailed):
        branch.prepare()
    branch.release()
    assert xid not in prepared(pg.resource) and pg.visible(xid.gtrid)


def test_rollback_to_savepoint_keeps_the_branch(pg: Any) -> None:
    """ROLLBACK TO SAVEPOINT answers ROLLBACK inside the transaction: the branch goes on
    and prepares YES."""
    xid = new_xid()
    branch = pg.resource.begin(xid)
    branch.execute("SAVEPOINT s")
    branch.execute("ROLLBACK TO SAVEPOINT s")
    pg.write(branch, xid.gtrid)
    assert branch.prepare() is Vote.YES
    branch.commit_prepared()
    branch.release()
    assert pg.visible(xid.gtrid)


def test_prepare_transaction_in_the_work_is_rolled_back(pg: Any) -> None:
    """PREPARE TRANSACTION 'x' as work: that prepared transaction is rolled back by its gid,
    execute says so, and neither 'x' nor the branch is left prepared."""
    xid = new_xid()
    foreign = f"conf-foreign-{secrets.token_hex(4)}"
    branch = pg.resource.begin(xid)
    pg.write(branch, xid.gtrid)
    try:
        with pytest.raises(PrepareFailed, match=f"'{foreign}' it left was rolled back"):
            branch.execute(f"PREPARE TRANSACTION '{foreign}'")
        with pytest.raises(PrepareFailed):
            branch.prepare()
        branch.release()
        assert foreign not in server_prepared(pg)
        assert xid not in prepared(pg.resource) and not pg.visible(xid.gtrid)
    finally:
        remove_prepared(pg, foreign)  # what a failed check would leave behind


def test_an_unreadable_prepared_gid_is_named_with_how_to_remove_it(pg: Any) -> None:
    """PREPARE TRANSACTION with a gid the branch cannot read (an E'' literal): the error
    says to find it in pg_prepared_xacts and remove it with ROLLBACK PREPARED."""
    xid = new_xid()
    foreign = f"conf-escaped-{secrets.token_hex(4)}"
    branch = pg.resource.begin(xid)
    pg.write(branch, xid.gtrid)
    try:
        with pytest.raises(PrepareFailed, match=r"pg_prepared_xacts.*ROLLBACK PREPARED"):
            branch.execute(f"PREPARE TRANSACTION E'{foreign}'")
        branch.release()
        assert foreign in server_prepared(pg)
    finally:
        remove_prepared(pg, foreign)


def test_prepare_of_a_transaction_ended_around_execute_votes_no(pg: Any) -> None:
    """The branch's transaction ended on its connection directly: PostgreSQL answers the
    PREPARE with ROLLBACK (and a WARNING), which is a NO vote naming that answer."""
    xid = new_xid()
    branch = pg.resource.begin(xid)
    pg.write(branch, xid.gtrid)
    pg.on_connection(branch, "ROLLBACK")
    assert branch.read_only() is False
    with pytest.raises(PrepareFailed, match=r"answered .* with ROLLBACK") as vote:
        branch.prepare()
    assert (vote.value.participant, vote.value.gtrid) == ("a", xid.gtrid)
    branch.release()
    assert xid not in prepared(pg.resource) and not pg.visible(xid.gtrid)


def test_sent_ahead_prepare_of_an_ended_transaction_votes_no(pg: Any) -> None:
    """The same with the PREPARE sent ahead (send_prepare, then prepare)."""
    xid = new_xid()
    branch = pg.resource.begin(xid)
    pg.write(branch, xid.gtrid)
    pg.on_connection(branch, "ROLLBACK")
    branch.send_prepare()
    with pytest.raises(PrepareFailed, match="ROLLBACK"):
        branch.prepare()
    branch.release()
    assert xid not in prepared(pg.resource)


@pytest.mark.parametrize("ended_by", ["ROLLBACK", "SELECT 1 / 0"])
def test_one_phase_commit_of_an_ended_or_failed_transaction_is_refused(
    pg: Any, ended_by: str
) -> None:
    """A one-phase COMMIT of a transaction ended or failed on the connection directly is
    refused (PostgreSQL would answer COMMIT with a WARNING, or ROLLBACK): nothing commits."""
    xid = new_xid()
    branch = pg.resource.begin(xid)
    pg.write(branch, xid.gtrid)
    with contextlib.suppress(psycopg.Error):
        pg.on_connection(branch, ended_by)
    with pytest.raises(CommitRefused, match="one-phase COMMIT") as refused:
        branch.commit_one_phase()
    assert isinstance(refused.value, ParticipantError) and refused.value.gtrid == xid.gtrid
    branch.release()
    assert not pg.visible(xid.gtrid)


def sessions_named(dsn: str, application_name: str) -> int:
    """How many sessions of the server carry ``application_name``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.lab
@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_every_session_of_the_resource_carries_its_application_name(
    settings: Settings, api: str
) -> None:
    """The branch's session and recovery's carry the resource's application_name, so that
    fencing by that name (docs/design.md §4) ends them all, on both APIs."""
    app = f"conf-app-{secrets.token_hex(4)}"
    xid = new_xid()
    if api == "sync":
        resource = PostgresResource("a", settings.pg_a, application_name=app)
        branch = resource.begin(xid)
        resource.recover(FORMAT_ID, "conf.")
        named = sessions_named(settings.pg_a, app)
        branch.rollback()
        branch.release()
        resource.close()
        assert named == 2  # the branch's and recovery's
        return

    async def scenario() -> int:
        resource = AsyncPostgresResource("a", settings.pg_a, application_name=app)
        branch = await resource.begin(xid)
        await resource.recover(FORMAT_ID, "conf.")
        await asyncio.to_thread(resource.recovery_resource().recover, FORMAT_ID, "conf.")
        named = await asyncio.to_thread(sessions_named, settings.pg_a, app)
        await branch.rollback()
        await branch.release()
        await resource.close()
        return named

    # The branch's, its own recovery connection and its recovery view's (worker threads).
    assert asyncio.run(scenario()) == 3


def test_recovery_view_of_a_pooled_asyncio_resource_refuses_the_loops_own_thread() -> None:
    """Recovery's view of an AsyncPostgresResource over a pool runs its calls on the loop,
    from a worker thread; called on the loop's own thread it raises instead of waiting
    for a loop it blocks."""

    async def scenario() -> None:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool("dbname=none", open=False)
        view = AsyncPostgresResource("a", pool).recovery_resource()
        with pytest.raises(InvalidTransition, match="worker thread"):
            view.recover(FORMAT_ID, "conf.")

    asyncio.run(scenario())
