"""Many coordinators on one lab (docs/design.md §4): application_name, liveness locks,
decision rows, fencing and peer recovery, against the real PostgreSQL and ActiveMQ of the lab."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from coordinator import failpoints
from coordinator.coordinator import Coordinator
from coordinator.errors import (
    ConfigurationError,
    CrashInjected,
    InvalidTransition,
    TransactionAborted,
)
from coordinator.log.memory import MemoryDecisionLog
from coordinator.states import Outcome
from coordinator.transaction import Transaction
from coordinator.xid import FORMAT_ID
from participants.activemq import marker_queue_for
from participants.aio.pg_branch import AsyncPostgresBranch
from participants.decision_table import PostgresDecisionTable
from participants.membership import PostgresMembership
from participants.pg_branch import PostgresBranch
from participants.postgres import PostgresResource
from scenarios import wiring
from scenarios.config import Settings
from scenarios.lab.services import Lab
from scenarios.torture.runner import Torture, peer_id
from scenarios.torture.schedules import Fault, peer_schedules
from tests.broker_queues import fresh_queue

pytestmark = pytest.mark.lab


def unique_id(stem: str) -> str:
    """A coordinator id no other test uses (letters, digits, dashes; at most 24)."""
    return f"{stem}-{os.getpid() % 10000}-{time.monotonic_ns() % 100000}"[:24]


def sessions_named(dsn: str, application_name: str) -> int:
    """How many sessions of ``dsn``'s server carry ``application_name``."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_every_session_of_a_coordinator_carries_its_id_as_application_name(
    settings: Settings,
) -> None:
    """The branch and recovery sessions of both databases say which coordinator opened them."""
    ident = unique_id("appname")
    mine = replace(settings, coordinator_id=ident)
    coordinator = wiring.open_coordinator(mine, sessions=2)
    try:
        with coordinator.transaction() as tx:
            tx.execute("a", "SELECT 1")
            tx.execute("b", "SELECT 1")
            assert sessions_named(settings.pg_a, ident) >= 1
            assert sessions_named(settings.pg_b, ident) >= 1
    finally:
        coordinator.close()
    assert sessions_named(settings.pg_a, ident) == 0


def test_every_session_of_an_asyncio_coordinator_carries_its_id_as_application_name(
    settings: Settings,
) -> None:
    """The asyncio coordinator the settings open names its sessions of both databases too."""
    ident = unique_id("appname-aio")
    coordinator = wiring.open_async_coordinator(replace(settings, coordinator_id=ident), sessions=2)

    async def scenario() -> list[int]:
        async with coordinator, coordinator.transaction() as tx:
            await tx.execute("a", "SELECT 1")
            await tx.execute("b", "SELECT 1")
            return [sessions_named(dsn, ident) for dsn in (settings.pg_a, settings.pg_b)]

    named = asyncio.run(scenario())
    assert named[0] >= 1 and named[1] >= 1, named
    assert sessions_named(settings.pg_a, ident) == 0


def test_the_asyncio_coordinator_of_the_settings_keeps_its_decisions_in_postgres(
    settings: Settings, tmp_path: Path
) -> None:
    """TWOPC_DECISIONS=postgres on asyncio: no decision log file; the decision row commits
    the transaction, END deletes it, and close leaves no session and no lock behind."""
    probe_tags(settings.pg_a), probe_tags(settings.pg_b)
    ident = unique_id("aio-pg")
    mine = postgres_mode(settings, ident, tmp_path)
    coordinator = wiring.open_async_coordinator(mine, sessions=2)
    tag = f"{ident}.row"

    async def scenario() -> tuple[Outcome | None, list[str], bool]:
        async with coordinator:
            held = lock_holder(settings.pg_a, ident) > 0
            async with coordinator.transaction() as tx:
                for name in ("a", "b"):
                    await tx.execute(name, "INSERT INTO peers_probe VALUES (%s)", (tag,))
            return tx.outcome, coordinator.in_doubt, held

    outcome, in_doubt, held = asyncio.run(scenario())
    assert (outcome, in_doubt, held) == (Outcome.COMMITTED, [], True)
    assert tag in probe_tags(settings.pg_a) and tag in probe_tags(settings.pg_b)
    assert decision_rows(settings.pg_a, f"{ident}.") == set()  # END deleted the row
    assert not mine.log_path.exists()
    assert sessions_named(settings.pg_a, ident) == sessions_named(settings.pg_b, ident) == 0


def pg_resources(settings: Settings, ident: str) -> list[PostgresResource]:
    """Databases 'a' and 'b' whose sessions are named ``ident``."""
    return [
        PostgresResource("a", settings.pg_a, application_name=ident, pool_size=4),
        PostgresResource("b", settings.pg_b, application_name=ident, pool_size=4),
    ]


def membership(settings: Settings, ident: str) -> PostgresMembership:
    """The liveness lock of ``ident`` on 'a', fencing over 'a' and 'b'."""
    databases = pg_resources(settings, ident)
    return PostgresMembership(ident, databases[0], databases)


def transfer_rows(tx: Transaction, tag: str) -> None:
    """A write on each database (a scratch table), so both branches must prepare."""
    for name in ("a", "b"):
        tx.execute(name, "CREATE TABLE IF NOT EXISTS peers_probe (tag text)")
        tx.execute(name, "INSERT INTO peers_probe VALUES (%s)", (tag,))


@pytest.fixture
def new_database(settings: Settings) -> Iterator[str]:
    """A database of its own on A's server, where no coordinator table exists yet."""
    name = f"twopc_new_{os.getpid()}"
    statements = [
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)),
    ]
    with psycopg.connect(settings.pg_a, autocommit=True) as admin:
        for statement in statements:
            admin.execute(statement)
    yield psycopg.conninfo.make_conninfo(settings.pg_a, dbname=name)
    with psycopg.connect(settings.pg_a, autocommit=True) as admin:
        admin.execute(statements[0])


def test_coordinators_starting_together_on_a_new_database_all_join(new_database: str) -> None:
    """Six coordinators that start at once where neither of their tables exists all join:
    CREATE TABLE IF NOT EXISTS run concurrently fails on PostgreSQL's catalog."""
    starting = 6
    together = threading.Barrier(starting)
    failures: list[str] = []
    joined: list[PostgresMembership] = []

    def start(ident: str) -> None:
        home = PostgresResource("a", new_database, application_name=ident, pool_size=1)
        member = PostgresMembership(ident, home, [home])
        decisions = PostgresDecisionTable(home)
        together.wait()
        try:
            member.join()
            decisions.create()
            joined.append(member)
        except Exception as exc:
            failures.append(f"{ident}: {exc}")
        finally:
            decisions.close()

    threads = [threading.Thread(target=start, args=(f"together-{n}",)) for n in range(starting)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert failures == []
        everyone = {f"together-{n}" for n in range(starting)}
        assert {member.coordinator_id for member in joined} == everyone
        for member in joined:
            assert set(member.peers()) == everyone - {member.coordinator_id}
    finally:
        for member in joined:
            member.leave()


def test_a_second_coordinator_with_a_live_id_is_refused(settings: Settings) -> None:
    """Joining with an id whose lock a live coordinator holds raises, naming the id."""
    ident = unique_id("dup")
    first = membership(settings, ident)
    first.join()
    try:
        with pytest.raises(ConfigurationError, match=ident):
            membership(settings, ident).join()
    finally:
        first.leave()
    second = membership(settings, ident)
    second.join()  # free again once the first left
    second.leave()


def test_a_coordinator_that_lost_its_lock_reaches_no_commit_point_until_it_holds_it(
    settings: Settings,
) -> None:
    """A fenced coordinator whose lock a peer holds commits nothing; after release it does."""
    ident, other = unique_id("live"), unique_id("peer")
    mine = membership(settings, ident)
    coordinator = Coordinator(
        ident,
        MemoryDecisionLog(),
        pg_resources(settings, ident),
        None,
        housekeeping_interval=None,
        membership=mine,
    )
    peer = membership(settings, other)
    peer.join()
    try:
        assert peer.claim(ident) is False  # alive: its lock is held
        with coordinator.transaction() as tx:
            transfer_rows(tx, "before")
        peer.fence(ident, timeout=10)
        assert sessions_named(settings.pg_a, ident) == 0
        assert mine.holds() is False
        assert peer.claim(ident) is True  # free: its owner's session is gone
        with (
            pytest.raises(TransactionAborted, match="liveness lock"),
            coordinator.transaction() as tx,
        ):
            transfer_rows(tx, "while-fenced")
        assert mine.keep() is False  # the peer holds it
        peer.release(ident)
        assert mine.keep() is True
        with coordinator.transaction() as tx:
            transfer_rows(tx, "after")
        assert tx.outcome is Outcome.COMMITTED
    finally:
        coordinator.close()
        peer.leave()
    with psycopg.connect(settings.pg_a) as conn:
        tags = {r[0] for r in conn.execute("SELECT tag FROM peers_probe").fetchall()}
    assert {"before", "after"} <= tags and "while-fenced" not in tags


def postgres_mode(settings: Settings, ident: str, home: Path) -> Settings:
    """``settings`` for coordinator ``ident`` with TWOPC_DECISIONS=postgres and its own home."""
    return replace(settings, coordinator_id=ident, decisions="postgres", home=home)


def kill_sessions(settings: Settings, ident: str) -> None:
    """What the death of coordinator ``ident``'s process does to its sessions: they end."""
    for name, dsn in (("a", settings.pg_a), ("b", settings.pg_b)):
        resource = PostgresResource(name, dsn)
        try:
            resource.end_sessions_named(ident, time.monotonic() + 10)
        finally:
            resource.close()


def prepared_gtrids(dsn: str, prefix: str) -> set[str]:
    """gids in pg_prepared_xacts whose gtrid starts with ``prefix`` (psycopg's tpc recover)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {x.gtrid for x in conn.tpc_recover() if x.gtrid.startswith(prefix)}


def probe_tags(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS peers_probe (tag text)")
        return {r[0] for r in conn.execute("SELECT tag FROM peers_probe").fetchall()}


def decision_rows(dsn: str, prefix: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT gtrid FROM twopc_decisions WHERE starts_with(gtrid, %s)", (prefix,)
        ).fetchall()
    return {r[0] for r in rows}


def test_postgres_mode_commits_a_database_only_transaction_by_its_decision_row(
    settings: Settings, tmp_path: Path
) -> None:
    """No local file, no forced write: A commits one-phase with its row, B prepared first."""
    ident = unique_id("cmr")
    coordinator = wiring.open_coordinator(postgres_mode(settings, ident, tmp_path), sessions=2)
    tag = f"cmr-{ident}"
    try:
        with coordinator.transaction() as tx:
            transfer_rows(tx, tag)
        assert tx.outcome is Outcome.COMMITTED
        assert decision_rows(settings.pg_a, tx.gtrid) == {tx.gtrid}  # until END's batch
        assert coordinator.log.forced_writes == 0
    finally:
        coordinator.close()
    assert tag in probe_tags(settings.pg_a) and tag in probe_tags(settings.pg_b)
    assert decision_rows(settings.pg_a, f"{ident}.") == set()  # END deleted it at close
    assert list(tmp_path.iterdir()) == []


def test_postgres_mode_puts_the_decision_row_into_a_branch_whose_work_was_ended(
    settings: Settings, tmp_path: Path
) -> None:
    """end_work on A, the decision participant, with another transaction in flight: A is
    not prepared early, and the transaction commits by the row the coordinator puts there."""
    ident = unique_id("cmr-ended")
    coordinator = wiring.open_coordinator(postgres_mode(settings, ident, tmp_path), sessions=3)
    tag = f"cmr-ended-{ident}"
    probe_tags(settings.pg_a), probe_tags(settings.pg_b)
    try:
        beside = coordinator.begin()  # in flight: end_work would prepare any other branch
        with coordinator.transaction() as tx:
            a = tx.branch("a")
            assert isinstance(a, PostgresBranch)
            a.defer("INSERT INTO peers_probe VALUES (%s)", (tag,))
            tx.end_work("a")
            assert prepared_gtrids(settings.pg_a, tx.gtrid) == set()
            with pytest.raises(InvalidTransition, match="takes no more work"):
                tx.execute("a", "SELECT 1")  # the caller's work is over all the same
            tx.execute("b", "INSERT INTO peers_probe VALUES (%s)", (tag,))
        beside.rollback()
        assert tx.outcome is Outcome.COMMITTED
        assert decision_rows(settings.pg_a, tx.gtrid) == {tx.gtrid}  # until END's batch
    finally:
        coordinator.close()
    assert tag in probe_tags(settings.pg_a) and tag in probe_tags(settings.pg_b)


def test_the_asyncio_coordinator_puts_the_decision_row_into_a_branch_whose_work_was_ended(
    settings: Settings, tmp_path: Path
) -> None:
    """The same on asyncio: end_work on A in postgres mode, then B's work; the
    transaction commits by its decision row in A."""
    ident = unique_id("aio-ended")
    coordinator = wiring.open_async_coordinator(
        postgres_mode(settings, ident, tmp_path), sessions=3
    )
    tag = f"aio-ended-{ident}"
    probe_tags(settings.pg_a), probe_tags(settings.pg_b)

    async def scenario() -> tuple[Outcome | None, set[str]]:
        async with coordinator:
            beside = coordinator.begin()
            async with coordinator.transaction() as tx:
                a = await tx.branch("a")
                assert isinstance(a, AsyncPostgresBranch)
                a.defer("INSERT INTO peers_probe VALUES (%s)", (tag,))
                await tx.end_work("a")
                await tx.execute("b", "INSERT INTO peers_probe VALUES (%s)", (tag,))
            rows = decision_rows(settings.pg_a, tx.gtrid)
            await beside.rollback()
            return tx.outcome, rows

    outcome, rows = asyncio.run(scenario())
    assert outcome is Outcome.COMMITTED and len(rows) == 1
    assert tag in probe_tags(settings.pg_a) and tag in probe_tags(settings.pg_b)


def test_postgres_mode_rolls_back_when_the_decision_participant_was_prepared_by_the_caller(
    settings: Settings, tmp_path: Path
) -> None:
    """prepare_now() on A, the decision participant: A cannot take the row, so the
    transaction rolls back naming why, and neither database keeps the work or a prepared
    branch."""
    ident = unique_id("cmr-prep")
    coordinator = wiring.open_coordinator(postgres_mode(settings, ident, tmp_path), sessions=2)
    tag = f"cmr-prep-{ident}"
    probe_tags(settings.pg_a), probe_tags(settings.pg_b)
    try:
        refused = pytest.raises(TransactionAborted, match="cannot take the coordinator's decision")
        with refused, coordinator.transaction() as tx:
            a = tx.branch("a")
            assert isinstance(a, PostgresBranch)
            a.defer("INSERT INTO peers_probe VALUES (%s)", (tag,))
            a.prepare_now()
            tx.execute("b", "INSERT INTO peers_probe VALUES (%s)", (tag,))
    finally:
        coordinator.close()
    assert tag not in probe_tags(settings.pg_a) and tag not in probe_tags(settings.pg_b)
    assert prepared_gtrids(settings.pg_a, f"{ident}.") == set()
    assert prepared_gtrids(settings.pg_b, f"{ident}.") == set()


@pytest.mark.parametrize(
    ("crash_at", "committed"),
    [
        ("before_decision_row_commit", False),
        ("after_decision_row_commit", True),
    ],
)
def test_a_restarted_coordinator_decides_by_the_decision_row(
    settings: Settings, tmp_path: Path, crash_at: str, committed: bool
) -> None:
    """Crash around A's one-phase commit, sessions gone: the next start commits B's prepared
    branch if A holds the row, else rolls it back."""
    ident = unique_id("cmr-crash")
    mine = postgres_mode(settings, ident, tmp_path)
    tag = f"{crash_at}-{ident}"
    crashed = wiring.open_coordinator(mine, sessions=2, housekeeping_interval=None)
    failpoints.arm(crash_at)
    try:
        tx = crashed.begin()
        transfer_rows(tx, tag)
        with pytest.raises(CrashInjected):
            tx.commit()
    finally:
        failpoints.disarm()
    assert prepared_gtrids(settings.pg_b, tx.gtrid) == {tx.gtrid}
    kill_sessions(settings, ident)  # the process died
    for branch in tx.branches.values():
        branch.release()  # only its (dead) connection objects: closed, not left to the GC
    restarted = wiring.open_coordinator(mine, sessions=2)
    try:
        report = restarted.last_recovery
        assert report is not None
        assert [(i.gtrid, i.decision_row) for i in report.items] == [(tx.gtrid, committed)]
        assert prepared_gtrids(settings.pg_b, tx.gtrid) == set()
        assert (tag in probe_tags(settings.pg_a)) is committed
        assert (tag in probe_tags(settings.pg_b)) is committed
        assert decision_rows(settings.pg_a, tx.gtrid) == set()
    finally:
        restarted.close()
        with contextlib.suppress(Exception):
            crashed.close()


def crash_in_flight(settings: Settings, ident: str, home: Path, crash_at: str) -> str:
    """Coordinator ``ident`` crashes at ``crash_at`` in a database-only transaction and its
    process dies (its sessions end); return the gtrid it left prepared in B."""
    crashed = wiring.open_coordinator(
        postgres_mode(settings, ident, home), sessions=2, housekeeping_interval=None
    )
    failpoints.arm(crash_at)
    try:
        tx = crashed.begin()
        transfer_rows(tx, f"{crash_at}-{ident}")
        with pytest.raises(CrashInjected):
            tx.commit()
    finally:
        failpoints.disarm()
    kill_sessions(settings, ident)
    for branch in tx.branches.values():
        branch.release()
    with contextlib.suppress(Exception):
        crashed.close()
    assert prepared_gtrids(settings.pg_b, tx.gtrid) == {tx.gtrid}
    return tx.gtrid


@pytest.mark.parametrize(
    ("crash_at", "committed"),
    [("before_decision_row_commit", False), ("after_decision_row_commit", True)],
)
def test_a_live_coordinator_recovers_a_dead_peer_by_its_decision_row(
    settings: Settings, tmp_path: Path, crash_at: str, committed: bool
) -> None:
    """A peer whose lock is free is fenced and recovered: row -> commit, none -> roll back."""
    dead, live = unique_id("dead"), unique_id("live")
    gtrid = crash_in_flight(settings, dead, tmp_path / "dead", crash_at)
    coordinator = wiring.open_coordinator(
        postgres_mode(settings, live, tmp_path / "live"), sessions=2, peer_interval=None
    )
    try:
        done = coordinator.recover_dead_peers()
    finally:
        coordinator.close()
    mine = [p for p in done if p.peer == dead]
    assert len(mine) == 1 and mine[0].resolved, mine
    assert mine[0].report is not None
    assert [(i.gtrid, i.decision.value) for i in mine[0].report.items] == [
        (gtrid, "commit" if committed else "rollback")
    ]
    assert prepared_gtrids(settings.pg_b, gtrid) == set()
    tag = f"{crash_at}-{dead}"
    assert (tag in probe_tags(settings.pg_a)) is committed
    assert (tag in probe_tags(settings.pg_b)) is committed
    assert decision_rows(settings.pg_a, gtrid) == set()


@pytest.mark.parametrize(
    ("crash_at", "committed"), [("before_broker_commit", False), ("after_broker_commit", True)]
)
def test_a_live_coordinator_recovers_a_dead_peer_by_the_marker_on_the_peers_own_queue(
    settings: Settings, tmp_path: Path, crash_at: str, committed: bool
) -> None:
    """A dead peer's marker is on its own queue (/queue/twopc.markers.<peer id>): the
    recoverer reads it there and commits, or finds none and rolls back; the marker goes."""
    dead, live = unique_id("mdead"), unique_id("mlive")
    crashed = wiring.open_coordinator(
        postgres_mode(settings, dead, tmp_path / "dead"), sessions=2, housekeeping_interval=None
    )
    failpoints.arm(crash_at)
    try:
        tx = crashed.begin()
        transfer_rows(tx, f"{crash_at}-{dead}")
        tx.send(fresh_queue("peers"), "{}")
        with pytest.raises(CrashInjected):
            tx.commit()
    finally:
        failpoints.disarm()
    kill_sessions(settings, dead)  # the process died: its sessions end, its sockets close
    for branch in tx.branches.values():
        branch.release()
    assert tx.broker is not None
    tx.broker.release()
    with contextlib.suppress(Exception):
        crashed.close()
    assert prepared_gtrids(settings.pg_b, tx.gtrid) == {tx.gtrid}
    coordinator = wiring.open_coordinator(
        postgres_mode(settings, live, tmp_path / "live"), sessions=2, peer_interval=None
    )
    try:
        done = coordinator.recover_dead_peers()
    finally:
        coordinator.close()
    mine = [p for p in done if p.peer == dead]
    assert len(mine) == 1 and mine[0].resolved, mine
    assert mine[0].report is not None
    assert [(i.gtrid, i.marker, i.decision.value) for i in mine[0].report.items] == [
        (tx.gtrid, committed, "commit" if committed else "rollback")
    ]
    assert prepared_gtrids(settings.pg_b, tx.gtrid) == set()
    tag = f"{crash_at}-{dead}"
    assert (tag in probe_tags(settings.pg_a)) is committed
    assert (tag in probe_tags(settings.pg_b)) is committed
    with wiring.open_stomp(settings) as client:
        left = client.browse(marker_queue_for(dead), idle_timeout=5.0)
    assert [m for m in left if not m.is_sentinel] == []


def test_a_peer_holding_its_lock_is_left_alone(settings: Settings, tmp_path: Path) -> None:
    """A live peer's prepared branch (its lock held) is not touched by another's recovery."""
    alive, other = unique_id("alive"), unique_id("other")
    owner = wiring.open_coordinator(
        postgres_mode(settings, alive, tmp_path / "a"), sessions=2, housekeeping_interval=None
    )
    watcher = wiring.open_coordinator(
        postgres_mode(settings, other, tmp_path / "b"), sessions=2, peer_interval=None
    )
    tx = owner.begin()
    try:
        transfer_rows(tx, f"alive-{alive}")
        tx.branch("b").prepare()  # as phase 1 would: prepared, not yet decided
        assert [p.peer for p in watcher.recover_dead_peers()] == []
        assert prepared_gtrids(settings.pg_b, tx.gtrid) == {tx.gtrid}
    finally:
        tx.branch("b").rollback()
        tx.rollback()
        watcher.close()
        owner.close()


def test_twopc_recover_dead_works_from_a_machine_without_the_dead_instances_files(
    settings: Settings, tmp_path: Path
) -> None:
    """`twopc recover --dead` with an empty home and an id of its own recovers the dead peer."""
    dead = unique_id("gone")
    gtrid = crash_in_flight(settings, dead, tmp_path / "dead", "after_decision_row_commit")
    shutil.rmtree(tmp_path / "dead", ignore_errors=True)  # the machine is lost with its disk
    env = {
        **os.environ,
        **settings.as_env(),
        "TWOPC_HOME": str(tmp_path / "ops"),
        "TWOPC_COORDINATOR_ID": unique_id("ops"),
        "TWOPC_DECISIONS": "postgres",
    }
    result = subprocess.run(
        [sys.executable, "-m", "scenarios.cli", "recover", "--dead", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    peers = {p["peer"]: p for p in json.loads(result.stdout)["peers"]}
    assert peers[dead]["resolved"] is True
    decisions = [t["decision"] for t in peers[dead]["recovery"]["transactions"]]
    assert decisions == ["commit"]
    assert prepared_gtrids(settings.pg_b, gtrid) == set()
    assert f"after_decision_row_commit-{dead}" in probe_tags(settings.pg_b)


def start_worker(
    settings: Settings, ident: str, home: Path, outcomes: Path
) -> subprocess.Popen[bytes]:
    """A coordinator process running database-only transactions (scenarios/peers/worker.py)."""
    env = {
        **os.environ,
        **postgres_mode(settings, ident, home).as_env(),
        "TWOPC_COORDINATOR_ID": ident,
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "scenarios.peers.worker", "--outcomes", str(outcomes)], env=env
    )
    deadline = time.monotonic() + 60
    while not (outcomes.exists() and outcomes.read_text().count("\n") >= 3):
        assert worker.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    return worker


def stop_when_prepared(settings: Settings, worker: subprocess.Popen[bytes], prefix: str) -> str:
    """SIGSTOP ``worker`` at a moment it has a branch prepared in B; return that gtrid."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        os.kill(worker.pid, signal.SIGSTOP)
        found = prepared_gtrids(settings.pg_b, prefix)
        if found:
            return sorted(found)[0]
        os.kill(worker.pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker never had a prepared branch in B")


def tags_with(dsn: str, prefix: str) -> set[str]:
    return {t for t in probe_tags(dsn) if t.startswith(prefix)}


def test_a_sigkilled_peer_is_recovered_by_a_running_coordinator_within_30_s(
    settings: Settings, tmp_path: Path
) -> None:
    """Killed with a branch prepared: a live coordinator's housekeeping resolves it unasked."""
    probe_tags(settings.pg_a), probe_tags(settings.pg_b)  # the table exists on both
    victim, live = unique_id("victim"), unique_id("keeper")
    keeper = wiring.open_coordinator(
        postgres_mode(settings, live, tmp_path / "keeper"), sessions=2, peer_interval=1.0
    )
    worker = start_worker(settings, victim, tmp_path / "victim", tmp_path / "outcomes")
    try:
        gtrid = stop_when_prepared(settings, worker, f"{victim}.")
        worker.kill()
        worker.wait()
        killed = time.monotonic()
        while prepared_gtrids(settings.pg_b, f"{victim}.") or prepared_gtrids(
            settings.pg_a, f"{victim}."
        ):
            assert time.monotonic() - killed < 30, f"{gtrid} still prepared after 30 s"
            time.sleep(0.2)
        while not any(p.peer == victim and p.resolved for p in keeper.peer_recoveries):
            assert time.monotonic() - killed < 30, "the keeper did not report the recovery"
            time.sleep(0.1)
    finally:
        keeper.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert tags_with(settings.pg_a, f"{victim}.") == tags_with(settings.pg_b, f"{victim}.")


def test_a_sigkilled_peer_is_recovered_by_a_running_asyncio_coordinator_within_30_s(
    settings: Settings, tmp_path: Path
) -> None:
    """The same on asyncio: the keeper's peer watch (a task) fences and resolves it unasked."""
    probe_tags(settings.pg_a), probe_tags(settings.pg_b)
    victim, live = unique_id("victim-aio"), unique_id("keeper-aio")
    keeper = wiring.open_async_coordinator(
        postgres_mode(settings, live, tmp_path / "keeper"), sessions=2, peer_interval=1.0
    )

    async def scenario() -> str:
        async with keeper:
            worker = start_worker(settings, victim, tmp_path / "victim", tmp_path / "outcomes")
            try:
                gtrid = stop_when_prepared(settings, worker, f"{victim}.")
                worker.kill()
                worker.wait()
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            killed = time.monotonic()
            while not any(p.peer == victim and p.resolved for p in keeper.peer_recoveries):
                assert time.monotonic() - killed < 30, f"{gtrid}'s coordinator not recovered"
                await asyncio.sleep(0.1)
            return gtrid

    gtrid = asyncio.run(scenario())
    assert prepared_gtrids(settings.pg_a, f"{victim}.") == set(), gtrid
    assert prepared_gtrids(settings.pg_b, f"{victim}.") == set(), gtrid
    assert tags_with(settings.pg_a, f"{victim}.") == tags_with(settings.pg_b, f"{victim}.")


def lock_holder(dsn: str, ident: str) -> int:
    """The backend pid holding coordinator ``ident``'s liveness lock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::bigint = %s AND objid::int = hashtext(%s) AND objsubid = 2",
            (FORMAT_ID, ident),
        ).fetchone()
    assert row is not None, f"nobody holds the lock of {ident}"
    return int(row[0])


def reported(outcomes: Path) -> dict[str, str]:
    """gtrid -> the outcome the worker was told, from its outcome lines."""
    lines = [json.loads(line) for line in outcomes.read_text().splitlines() if line]
    return {r["gtrid"]: r["outcome"] for r in lines if "gtrid" in r}


def test_a_paused_coordinator_fenced_by_a_peer_never_commits_after_it_wakes(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGSTOP with a branch prepared, its lock session lost, a peer fences and recovers it,
    SIGCONT: that transaction ends as the peer decided, A and B agree, and it goes on."""
    probe_tags(settings.pg_a), probe_tags(settings.pg_b)
    zombie, live = unique_id("zombie"), unique_id("fencer")
    prefix = f"{zombie}."
    outcomes = tmp_path / "outcomes"
    worker = start_worker(settings, zombie, tmp_path / "zombie", outcomes)
    fencer = wiring.open_coordinator(
        postgres_mode(settings, live, tmp_path / "fencer"), sessions=2, peer_interval=None
    )
    try:
        gtrid = stop_when_prepared(settings, worker, prefix)
        # The server loses the paused process's lock session (as a keepalive timeout would).
        with psycopg.connect(settings.pg_a, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(%s, 5000)", (lock_holder(settings.pg_a, zombie),)
            )
        done = [p for p in fencer.recover_dead_peers() if p.peer == zombie]
        assert len(done) == 1 and done[0].resolved and done[0].report is not None, done
        decision = {i.gtrid: i.decision.value for i in done[0].report.items}[gtrid]
        assert prepared_gtrids(settings.pg_b, gtrid) == set()
        assert sessions_named(settings.pg_a, zombie) == sessions_named(settings.pg_b, zombie) == 0
        before = set(reported(outcomes))
        os.kill(worker.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while True:  # it decides its transaction, takes its lock again and commits anew
            told = reported(outcomes)
            later = [g for g, outcome in told.items() if g not in before and g != gtrid]
            if gtrid in told and sum(told[g] == "committed" for g in later) >= 5:
                break
            assert time.monotonic() < deadline, "the zombie did not go on after waking"
            time.sleep(0.1)
        assert lock_holder(settings.pg_a, zombie) > 0
        worker.kill()  # and dies for good: the fencer recovers what it left this time
        worker.wait()
        deadline = time.monotonic() + 30
        while prepared_gtrids(settings.pg_b, prefix) or prepared_gtrids(settings.pg_a, prefix):
            fencer.recover_dead_peers()
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGCONT)
            worker.kill()
            worker.wait(timeout=30)
        fencer.close()
    told = reported(outcomes)[gtrid]
    assert told == "committed" if decision == "commit" else told in ("aborted", "in-doubt")
    assert (gtrid in tags_with(settings.pg_a, prefix)) is (decision == "commit")
    assert (gtrid in tags_with(settings.pg_b, prefix)) is (decision == "commit")
    assert tags_with(settings.pg_a, prefix) == tags_with(settings.pg_b, prefix)


PEER_SCHEDULES = {s.name: s for s in peer_schedules(0)}


def test_peer_schedules_run_two_or_three_coordinators_and_kill_or_pause_the_first() -> None:
    """The several-coordinator schedules: 2-3 children each, kills and pauses, unique names."""
    assert {s.coordinators for s in PEER_SCHEDULES.values()} == {2, 3}
    assert {Fault.FAILPOINT, Fault.COORDINATOR_KILL, Fault.PAUSE} <= {
        s.fault for s in PEER_SCHEDULES.values()
    }
    assert all("coordinators (postgres)" in s.describe() for s in PEER_SCHEDULES.values())


@pytest.mark.parametrize("name", ["peers x3 coordinator-kill", "peers x2 pause, resume"])
def test_a_torture_schedule_of_several_coordinators_keeps_every_invariant(
    settings: Settings, lab: Lab, name: str
) -> None:
    """Three coordinators, one SIGKILLed (or two, one paused): recovered, every invariant holds."""
    with Torture(settings, lab=lab) as torture:
        result = torture.run(PEER_SCHEDULES[name])
    assert result.ok, result.problems
    assert result.outcomes["committed"] > 0
    assert result.notes.get("paused_recovery") in (None, "refused")
    for index in range(PEER_SCHEDULES[name].coordinators):
        assert prepared_gtrids(settings.pg_a, f"{peer_id(index)}.") == set()
        assert prepared_gtrids(settings.pg_b, f"{peer_id(index)}.") == set()


def test_indoubt_in_postgres_mode_reads_the_decision_rows_and_changes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """`twopc indoubt`'s dry run shows a dead coordinator's row and its decision, unfenced."""
    dead, live = unique_id("dry"), unique_id("dry-live")
    gtrid = crash_in_flight(settings, dead, tmp_path / "dead", "after_decision_row_commit")
    items = wiring.in_doubt(postgres_mode(settings, dead, tmp_path / "dead"))
    assert [(i.gtrid, i.decision_row, i.decision.value) for i in items] == [(gtrid, True, "commit")]
    assert prepared_gtrids(settings.pg_b, gtrid) == {gtrid}  # the dry run changed nothing
    coordinator = wiring.open_coordinator(
        postgres_mode(settings, live, tmp_path / "live"), sessions=2, peer_interval=None
    )
    try:
        assert [p.resolved for p in coordinator.recover_dead_peers() if p.peer == dead] == [True]
    finally:
        coordinator.close()
    assert prepared_gtrids(settings.pg_b, gtrid) == set()
