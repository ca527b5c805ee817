"""The 2PC transfer on the real lab: atomicity, conservation, recovery after kill -9, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator.errors import (
    ConfigurationError,
    DecisionLogLocked,
    ParticipantUnavailable,
    TransactionTimeout,
)
from coordinator.states import Outcome, Vote
from coordinator.xid import FORMAT_ID, Xid
from participants.aio.postgres import AsyncPostgresResource
from participants.postgres import PostgresResource
from scenarios.config import Settings
from scenarios.lab.services import Lab
from scenarios.stories import STORIES
from scenarios.strategies import transfer_2pc_aio
from scenarios.strategies.transfer_2pc import transfer_2pc
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.transfer.invariants import gather_evidence
from scenarios.wiring import open_async_coordinator, open_coordinator
from tests.aio_portal import Blocking, Portal
from tests.conftest import end_sessions, free_port

pytestmark = pytest.mark.lab

TWOPC = [sys.executable, "-m", "scenarios.cli"]
COMPLETED = {scenario.TYPE_HEADER: scenario.TRANSFER_COMPLETED}
ACCOUNTS = 50


@pytest.fixture
def fresh(settings: Settings) -> Settings:
    """Tables reset (recovery first), 50 accounts of 1,000 in A and B, queue empty."""
    open_coordinator(settings).close()
    scenario.reset(settings, accounts=ACCOUNTS, balance=1_000)
    return settings


def _assert_batch_kept_every_invariant(settings: Settings, result: Any, count: int) -> None:
    """Every transfer told an outcome, none in doubt; money conserved; ids in A iff in B
    iff one message; nothing prepared, no marker left."""
    assert sum(result.outcomes.values()) == count
    assert result.outcomes["committed"] > 0 and result.outcomes["in-doubt"] == 0
    evidence = gather_evidence(settings)
    assert evidence.total_now == evidence.total_expected == 2 * ACCOUNTS * 1_000
    assert evidence.atomicity_violations == [] and evidence.duplicates == []
    assert len(evidence.in_a) == result.outcomes["committed"]
    assert evidence.prepared == [] and evidence.markers == set()


def test_thousand_transfers_at_concurrency_8_keep_every_invariant(fresh: Settings) -> None:
    """1,000 transfers: money conserved; ids in A iff in B iff one message; nothing prepared."""
    coordinator = open_coordinator(fresh, sessions=8)
    try:
        plan = scenario.plan(1000, accounts=ACCOUNTS, seed=7)
        result = run_batch(plan, lambda t: transfer_2pc(coordinator, t), concurrency=8)
        stats = coordinator.stats()
    finally:
        coordinator.close()
    _assert_batch_kept_every_invariant(fresh, result, 1000)
    # Presumed abort with the broker as commit point: no forced log write per commit.
    assert stats["forced_log_writes"] <= 2
    assert stats["marker_messages"] == result.outcomes["committed"]


def test_transfers_with_a_prepared_early_keep_every_invariant(fresh: Settings) -> None:
    """300 transfers, 8 at a time, with A's work ended as soon as its debit is checked
    (end_work: A prepared then, beside other transfers): money conserved, ids in A iff in B
    iff one message, nothing left prepared."""
    coordinator = open_coordinator(fresh, sessions=8)
    try:
        plan = scenario.plan(300, accounts=ACCOUNTS, seed=5)
        result = run_batch(
            plan, lambda t: transfer_2pc(coordinator, t, end_a_work=True), concurrency=8
        )
    finally:
        coordinator.close()
    _assert_batch_kept_every_invariant(fresh, result, 300)


def test_transfers_on_the_same_rows_never_deadlock_across_the_databases(fresh: Settings) -> None:
    """Hot rows in A and B, 8 threads: the work runs in written order, so every transfer commits.

    Only PREPARE and COMMIT PREPARED run on both databases at once. Work sent to
    both at once would take B's row lock before A's in some transfers: two of
    them would then wait for each other across the databases, which neither
    database can see, until the transaction timeout aborted them.
    """
    coordinator = open_coordinator(fresh, sessions=8)
    run_id = scenario.new_run_id()
    hot = [
        scenario.Transfer(f"{run_id}-{n:04d}", scenario.account_id(0), scenario.account_id(1), 1)
        for n in range(240)
    ]
    try:
        coordinator.timeout = 5.0
        result = run_batch(hot, lambda t: transfer_2pc(coordinator, t), concurrency=8)
    finally:
        coordinator.close()
    assert result.outcomes["committed"] == len(hot), result.outcomes
    evidence = gather_evidence(fresh)
    assert evidence.total_now == evidence.total_expected
    assert evidence.prepared == [] and evidence.atomicity_violations == []


def test_kill_9_of_a_running_transfer_then_recover_keeps_every_invariant(
    fresh: Settings,
) -> None:
    """Repeatedly kill -9 a running 'twopc transfer' at a random moment, then 'twopc recover'."""
    rng = random.Random(11)
    for _ in range(3):
        child = subprocess.Popen(
            [
                *TWOPC,
                "transfer",
                "--count",
                "2000",
                "--concurrency",
                "8",
                "--accounts",
                str(ACCOUNTS),
                "--no-check",
                "--json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.8, 2.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        recovered = subprocess.run(
            [*TWOPC, "recover", "--json"], capture_output=True, text=True, check=False
        )
        assert recovered.returncode == 0, recovered.stderr
        assert json.loads(recovered.stdout)["resolved"] is True
        evidence = gather_evidence(fresh)
        assert evidence.ok, evidence.as_dict()
        assert evidence.markers == set()


def test_insufficient_funds_is_a_no_vote_with_nothing_visible(fresh: Settings) -> None:
    """Debiting more than the balance aborts: no row, no message, no prepared branch."""
    coordinator = open_coordinator(fresh, sessions=2)
    try:
        t = scenario.Transfer("poor-1", scenario.account_id(0), scenario.account_id(1), 1_001)
        outcome, reason = transfer_2pc(coordinator, t)
    finally:
        coordinator.close()
    assert outcome is Outcome.ABORTED and "voted NO" in reason
    evidence = gather_evidence(fresh)
    assert "poor-1" not in evidence.in_a | evidence.in_b | set(evidence.on_queue)
    assert evidence.prepared == [] and evidence.total_now == evidence.total_expected


@pytest.mark.parametrize("name", list(STORIES))
def test_scenario_scripts_keep_their_promises(fresh: Settings, name: str) -> None:
    """Each scenario script runs on the real services and its evidence matches 2PC's promise."""
    story = STORIES[name](fresh)
    assert story.ok, "\n".join(story.lines)
    assert any(line.startswith("evidence:") for line in story.lines)


@pytest.mark.parametrize("api", ["threads", "asyncio"])
def test_a_transfer_that_outlives_its_timeout_is_told_aborted(fresh: Settings, api: str) -> None:
    """A debit blocked past the transaction's timeout (its row locked by another session):
    the watchdog rolls the transfer back and it is told ABORTED, not an exception, on both
    APIs; nothing of it is visible."""
    t = scenario.Transfer(f"late-{api}", scenario.account_id(0), scenario.account_id(1), 5)

    async def on_asyncio() -> tuple[Outcome, str]:
        async with open_async_coordinator(fresh, sessions=2, timeout=1.0) as coordinator:
            return await transfer_2pc_aio.transfer_2pc(coordinator, t)

    with psycopg.connect(fresh.pg_a) as holder:  # holds the source's row until the end
        holder.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (t.source,))
        if api == "asyncio":
            outcome, reason = asyncio.run(on_asyncio())
        else:
            coordinator = open_coordinator(fresh, sessions=2, timeout=1.0)
            try:
                outcome, reason = transfer_2pc(coordinator, t)
            finally:
                coordinator.close()
        holder.rollback()
    assert outcome is Outcome.ABORTED, reason
    assert "exceeded its timeout" in reason
    evidence = gather_evidence(fresh)
    assert t.transfer_id not in evidence.in_a | evidence.in_b | set(evidence.on_queue)
    assert evidence.prepared == [] and evidence.total_now == evidence.total_expected


def test_unreachable_database_is_a_clear_error_and_commits_nothing(fresh: Settings) -> None:
    """A database that does not answer: ParticipantUnavailable naming it and what to do."""
    dead = f"host=127.0.0.1 port={free_port()} user=twopc dbname=twopc connect_timeout=2"
    settings = dataclasses.replace(fresh, pg_b=dead)
    with pytest.raises(ParticipantUnavailable) as info:
        open_coordinator(settings)
    message = str(info.value)
    assert "participant 'b'" in message and "TWOPC_PG_B" in message
    assert "twopc lab up" in message


def test_broker_down_makes_transfers_abort_cleanly(fresh: Settings, lab: Lab) -> None:
    """With the broker stopped, a transfer aborts with a clear error and leaves nothing."""
    coordinator = open_coordinator(fresh, sessions=2)
    try:
        lab.stop_service("activemq")
        t = scenario.Transfer("nobroker-1", scenario.account_id(0), scenario.account_id(1), 5)
        outcome, reason = transfer_2pc(coordinator, t)
    finally:
        coordinator.close()
        lab.start_service("activemq")
    assert outcome is Outcome.ABORTED
    assert "broker" in reason.lower() or "stomp" in reason.lower()
    evidence = gather_evidence(fresh)
    assert "nobroker-1" not in evidence.in_a | evidence.in_b
    assert evidence.prepared == []


def test_second_coordinator_on_the_same_log_is_refused(settings: Settings) -> None:
    """One coordinator per decision log: a second one gets DecisionLogLocked naming the pid."""
    first = open_coordinator(settings, sessions=1)
    try:
        with pytest.raises(DecisionLogLocked, match=str(os.getpid())):
            open_coordinator(settings, sessions=1)
    finally:
        first.close()


def test_corrupt_log_is_refused_with_the_offset(settings: Settings, tmp_path: Path) -> None:
    """'twopc recover' on a log damaged in the middle exits 1 naming the byte offset."""
    from coordinator.log import format as log_format

    home = tmp_path / "home"
    home.mkdir()
    good = log_format.encode(log_format.Commit("twopc.x1", ("a", "b")))
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF
    (home / "decisions.log").write_bytes(log_format.HEADER + bytes(damaged) + good)
    env = {**os.environ, **settings.as_env(), "TWOPC_HOME": str(home)}
    result = subprocess.run(
        [*TWOPC, "recover"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 1
    assert f"offset {len(log_format.HEADER)}" in result.stderr


def test_rollback_on_error_in_work_leaves_nothing(fresh: Settings) -> None:
    """An exception inside the transaction block rolls back both branches and the send."""
    coordinator = open_coordinator(fresh, sessions=2)
    try:
        with pytest.raises(RuntimeError), coordinator.transaction() as tx:
            tx.execute("a", "INSERT INTO transfers (transfer_id, amount) VALUES ('err-1', 1)")
            tx.execute("b", "INSERT INTO transfers (transfer_id, amount) VALUES ('err-1', 1)")
            tx.send(scenario.EVENT_TOPIC, "{}", {"transfer-id": "err-1", **COMPLETED})
            raise RuntimeError("the caller changed its mind")
        with pytest.raises(TransactionTimeout), coordinator.transaction(timeout=0.2) as tx:
            tx.execute("a", "SELECT pg_sleep(0.5)")
            tx.execute("b", "INSERT INTO transfers (transfer_id, amount) VALUES ('err-2', 1)")
            tx.send(scenario.EVENT_TOPIC, "{}", {"transfer-id": "err-2", **COMPLETED})
    finally:
        coordinator.close()
    evidence = gather_evidence(fresh)
    assert not {"err-1", "err-2"} & (evidence.in_a | evidence.in_b | set(evidence.on_queue))


@contextmanager
def postgres_resource(api: str, name: str, source: str) -> Iterator[Any]:
    """A PostgresResource, or an AsyncPostgresResource whose calls block through a portal."""
    if api == "sync":
        yield PostgresResource(name, source)
        return
    portal = Portal()
    try:
        yield Blocking(portal, AsyncPostgresResource(name, source))
    finally:
        portal.close()


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_sessions_the_server_ended_are_replaced_by_begin_and_recovery(
    settings: Settings, api: str
) -> None:
    """Idle pooled and recovery sessions ended by the server are replaced; nothing fails
    (the sync and the asyncio resource)."""
    app = f"twopc-test-{os.getpid()}-{time.monotonic_ns()}"
    with postgres_resource(api, "a", f"{settings.pg_a} application_name={app}") as resource:
        sessions_are_replaced(settings, resource, app)


def sessions_are_replaced(settings: Settings, resource: Any, app: str) -> None:
    prefix = f"ended{os.getpid()}."
    first = resource.begin(Xid.branch(f"{prefix}1", "a"))
    first.execute("CREATE TABLE IF NOT EXISTS ended_probe (x int)")  # a write: it is prepared
    assert first.prepare() is Vote.YES
    first.commit_prepared()
    first.release()  # back to the pool, idle
    assert resource.recover(FORMAT_ID, prefix) == {}  # the recovery session is kept too
    with psycopg.connect(settings.pg_a, autocommit=True) as admin:
        sessions = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall()
    assert end_sessions(settings.pg_a, [pid for (pid,) in sessions]) == 2  # pooled, recovery
    second = resource.begin(Xid.branch(f"{prefix}2", "a"))
    second.execute("INSERT INTO ended_probe VALUES (1)")
    assert second.prepare() is Vote.YES
    assert [x.gtrid for x in resource.recover(FORMAT_ID, prefix)] == [f"{prefix}2"]
    assert resource.rollback_recovered(Xid.branch(f"{prefix}2", "a")) is True
    second.release()
    resource.close()


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_max_prepared_transactions_zero_is_refused_with_the_reason(
    server_without_prepared_transactions: str, api: str
) -> None:
    """A server with max_prepared_transactions = 0 gets a clear error saying why 2PC needs it
    (the sync and the asyncio resource)."""
    with (
        postgres_resource(api, "a", server_without_prepared_transactions) as resource,
        pytest.raises(ConfigurationError, match="max_prepared_transactions = 0") as info,
    ):
        resource.connect()
    assert "PREPARE TRANSACTION" in str(info.value)


def test_indoubt_lists_without_changing_and_recover_resolves(fresh: Settings) -> None:
    """'twopc indoubt' shows a branch left prepared by a killed coordinator (exit 3); 'recover'
    ends it, and 'indoubt' then exits 0."""
    from scenarios.stories import prepared_gids, run_child

    t = scenario.Transfer("doubt-1", scenario.account_id(0), scenario.account_id(1), 5)
    gtrid = f"{fresh.coordinator_id}.doubt-1"
    assert run_child(t, "after_prepare=kill@2") == -signal.SIGKILL
    for _ in range(2):  # listing twice changes nothing
        listed = subprocess.run(
            [*TWOPC, "indoubt", "--json"], capture_output=True, text=True, check=False
        )
        assert listed.returncode == 3, listed.stderr
        (item,) = json.loads(listed.stdout)["transactions"]
        assert item["gtrid"] == gtrid and item["prepared_in"] == ["a", "b"]
        assert item["logged_commit"] is False and item["marker"] is False
        assert item["decision"] == "rollback" and item["age_seconds"] >= 0
        assert prepared_gids(fresh.pg_a, gtrid) == 1
    recovered = subprocess.run(
        [*TWOPC, "recover", "--json"], capture_output=True, text=True, check=True
    )
    (done,) = json.loads(recovered.stdout)["transactions"]
    assert done["done"] == ["a: rolled back", "b: rolled back"]
    assert prepared_gids(fresh.pg_a, gtrid) == 0 and prepared_gids(fresh.pg_b, gtrid) == 0
    nothing = subprocess.run(
        [*TWOPC, "indoubt", "--json"], capture_output=True, text=True, check=False
    )
    assert nothing.returncode == 0, nothing.stderr
    assert json.loads(nothing.stdout)["transactions"] == []


def test_paused_broker_at_commit_point_is_in_doubt_then_resolved(fresh: Settings, lab: Lab) -> None:
    """A broker paused (SIGSTOP) at COMMIT: IN_DOUBT, never a guess; after SIGCONT the running
    coordinator fences the session, finds the marker and commits both branches."""
    coordinator = open_coordinator(fresh, sessions=2, receipt_timeout=1.0)
    t = scenario.Transfer("paused-1", scenario.account_id(0), scenario.account_id(1), 5)
    try:
        tx = coordinator.begin(f"{fresh.coordinator_id}.paused-1")
        tx.execute("a", scenario.DEBIT_TO, t.debit())
        tx.execute("b", scenario.CREDIT, {"amount": 5, "account": t.target, "tid": t.transfer_id})
        tx.send(scenario.EVENT_TOPIC, t.body(), t.headers(scenario.TRANSFER_COMPLETED))
        lab.kill("activemq", signal.SIGSTOP)
        try:
            outcome = tx.commit()
        finally:
            lab.kill("activemq", signal.SIGCONT)
        assert outcome is Outcome.IN_DOUBT and "COMMIT" in tx.reason
        assert coordinator.in_doubt == [tx.gtrid]
        deadline = time.monotonic() + 30
        while coordinator.in_doubt and time.monotonic() < deadline:
            time.sleep(0.2)  # the coordinator's own housekeeping resolves it
        assert coordinator.in_doubt == []
    finally:
        coordinator.close()
    evidence = gather_evidence(fresh)
    assert "paused-1" in evidence.in_a and "paused-1" in evidence.in_b
    assert evidence.on_queue["paused-1"] == 1
    assert evidence.ok and evidence.markers == set()
