"""The crash torture on the real lab: the whole matrix once, a few random schedules, the checks.

Every failpoint a transfer or its recovery passes through is fired as a
SIGKILL of a real ``twopc`` process, and each real fault kind is injected
once (coordinator SIGKILL, PostgreSQL A and B stopped in immediate mode, the
broker SIGKILLed, connections reset / blackholed / delayed through the proxy,
the coordinator paused); after ``twopc recover`` the invariants are checked
on PostgreSQL and ActiveMQ themselves (the asyncio coordinator's:
tests/test_torture_aio.py). The last tests are reproductions of
coordinator bugs the torture found, kept as regression tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator.coordinator import Coordinator
from coordinator.log.file import FileDecisionLog
from coordinator.states import Outcome
from coordinator.xid import FORMAT_ID
from participants.postgres import PostgresResource
from scenarios.config import Settings
from scenarios.lab.services import Lab
from scenarios.strategies.transfer_2pc import transfer_2pc
from scenarios.torture.ledger import Ledger
from scenarios.torture.report import summary
from scenarios.torture.runner import Torture
from scenarios.torture.schedules import (
    LOG_FAILPOINTS,
    RECOVERY_FAILPOINTS,
    TRANSFER_FAILPOINTS,
    Fault,
    Schedule,
    matrix,
    random_schedules,
)
from scenarios.transfer import model as scenario
from scenarios.wiring import open_coordinator
from tests.conftest import open_stomp_client

pytestmark = pytest.mark.lab

TWOPC_TORTURE = [sys.executable, "-m", "scenarios.cli", "torture"]
MATRIX = matrix(seed=4)
RANDOM = random_schedules(3, seed=4)


@pytest.fixture(scope="module")
def torture(lab: Lab, settings: Settings) -> Iterator[Torture]:
    """A torture runner on the lab: proxies up, tables reset, ledger empty."""
    with Torture(settings, lab=lab) as runner:
        yield runner


def test_matrix_covers_every_failpoint_and_every_fault_kind() -> None:
    """The matrix arms each failpoint as a kill and injects each fault kind at least once."""
    armed = " ".join(f"{s.failpoints} {s.recovery_failpoints}" for s in MATRIX)
    for name in (*TRANSFER_FAILPOINTS, *RECOVERY_FAILPOINTS, *LOG_FAILPOINTS):
        assert f"{name}=kill" in armed, name
    assert {s.fault for s in MATRIX} == set(Fault)
    assert len({s.name for s in MATRIX}) == len(MATRIX)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", MATRIX, ids=[s.name for s in MATRIX])
def test_matrix_schedule_keeps_every_invariant(torture: Torture, schedule: Schedule) -> None:
    """After the fault and 'twopc recover': atomic, conserved, nothing prepared, no marker left."""
    result = torture.run(schedule)
    assert result.ok, result.problems
    assert result.recovery.resolved
    if schedule.name.startswith("kill@"):
        assert result.failpoint_fired, f"{schedule.failpoints} did not fire"
        if schedule.recovery_failpoints:
            assert result.recovery.failpoint_fired, f"{schedule.recovery_failpoints} did not fire"
            assert len(result.recovery.passes) >= 2
    if schedule.fault is Fault.PAUSE:
        assert result.notes["paused_recovery"] == "refused"
        assert "locked by process" in result.notes["paused_recovery_error"]
    if schedule.fault is Fault.NET_BLACKHOLE and schedule.variant == "kill":
        assert result.notes["partition_recovery"] in ("refused", "resolved")
    if schedule.fault in (Fault.NET_RESET, Fault.NET_REFUSE):
        assert result.notes["connections_reset"] > 0
    if schedule.fault not in (Fault.FAILPOINT, Fault.NET_DELAY):
        assert result.notes["alive_at_fault"], "the fault came after the batch had finished"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", RANDOM, ids=[s.name for s in RANDOM])
def test_random_schedule_keeps_every_invariant(torture: Torture, schedule: Schedule) -> None:
    """A random mix of a fault, transfer and recovery failpoints keeps every invariant."""
    result = torture.run(schedule)
    assert result.ok, (schedule.describe(), result.problems)


def test_committed_outcomes_were_checked_against_the_services(torture: Torture) -> None:
    """The ledger has seen the reported outcomes and the deliveries of every schedule so far."""
    reported = torture.ledger.reported
    committed = {t for t, outcome in reported.items() if outcome == "committed"}
    assert len(committed) > 100
    assert committed <= set(torture.ledger.deliveries)


def test_checks_catch_each_kind_of_violation(torture: Torture, settings: Settings) -> None:
    """Tampered services fail the check: a one-sided row, a moved balance, a duplicate, no key."""
    ledger = Ledger(settings)  # a second consumer that knows what was delivered so far
    ledger.deliveries.update(torture.ledger.deliveries)
    assert not ledger.check({}).problems()
    orphan = f"tamper-{uuid.uuid4().hex[:8]}"
    copied = f"tamper-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.pg_a) as conn:
        conn.execute("INSERT INTO transfers (transfer_id, amount) VALUES (%s, 1)", (orphan,))
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 'acc-00000'")
    with open_stomp_client(settings.stomp) as client:
        body = json.dumps({"transfer_id": copied})
        for _ in range(2):  # one message twice, and one the inbox cannot key
            client.send(scenario.EVENT_TOPIC, body, {"transfer-id": copied}, receipt_timeout=5)
        client.send(scenario.EVENT_TOPIC, "{}", {}, receipt_timeout=5)
    try:
        check = ledger.check({orphan: "aborted", copied: "committed"})
        assert orphan in check.atomicity_violations and copied in check.atomicity_violations
        assert not check.money_conserved
        assert check.duplicates_before_dedup == 1 and check.duplicates_after_dedup == 1
        assert check.committed_not_durable == [copied]
        assert check.aborted_but_visible == [orphan]
        assert len(check.problems()) == 5  # the orphan is in A only: not a lost message
        again = ledger.check({})
        assert again.atomicity_violations == [] and again.money_conserved  # counted once
    finally:
        with psycopg.connect(settings.pg_a) as conn:
            conn.execute("DELETE FROM transfers WHERE transfer_id = %s", (orphan,))
            conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 'acc-00000'")
    assert not torture.ledger.check({}).problems()  # the torture's own ledger saw none of it


def test_summary_is_not_ok_when_a_schedule_broke_an_invariant(torture: Torture) -> None:
    """The figures flag a failed invariant (an exception told to a caller is one, a child
    that died of an error another, the fault's or another coordinator's), and the CLI's exit
    status follows 'ok'."""
    result = torture.run(Schedule("no fault", Fault.FAILPOINT, count=5, concurrency=1))
    assert summary([result], 1.0)["ok"]
    broken = replace(result, check=replace(result.check, prepared_left=["a:twopc.x"]))
    report = summary([result, broken], 2.0)
    assert not report["ok"]
    assert report["figures"]["prepared_left"] == 1
    assert report["failed_schedules"][0]["problems"] == ["prepared transactions left: a:twopc.x"]
    errored = replace(result, errors=["OSError(9, 'Bad file descriptor')"])
    report = summary([result, errored], 2.0)
    assert not report["ok"]
    assert report["figures"]["errors_to_callers"] == 1
    assert "exception instead of an outcome" in report["failed_schedules"][0]["problems"][0]
    crashed = replace(result, exit_code=1, notes={"child_stderr": "NameError: name 'x'\n"})
    report = summary([result, crashed], 2.0)
    assert not report["ok"]
    assert report["figures"]["children_died"] == 1
    assert report["failed_schedules"][0]["problems"] == [
        "the child exited with 1, neither finished nor killed (its last line: NameError: name 'x')"
    ]
    peers_crashed = replace(result, notes={"survivors_exit": [0, 1, -9]})
    report = summary([result, peers_crashed], 2.0)
    assert not report["ok"]
    assert report["figures"]["children_died"] == 1
    assert (
        "other coordinators' children exited with [1]"
        in (report["failed_schedules"][0]["problems"][0])
    )


@pytest.mark.slow
def test_twopc_torture_command_runs_and_reports_json(lab: Lab, torture: Torture) -> None:
    """'twopc torture --no-matrix --schedules 2 --json' exits 0 with every figure."""
    done = subprocess.run(
        [*TWOPC_TORTURE, "--no-matrix", "--schedules", "2", "--seed", "9", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["figures"]["schedules"] == 2
    for key in ("atomicity_violations", "lost_messages", "duplicates_after_dedup"):
        assert report["figures"][key] == 0
    assert "recovery_p99" in report["figures"]


# -- reproductions of bugs the torture found ----------------------------------------------


def _terminate_pid(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _terminate_session(dsn: str, pid: int) -> int:
    """End the session with backend ``pid``; return how many ended (0 or 1)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    return int(bool(row and row[0]))


def test_a_connection_lost_during_the_work_makes_the_transfer_abort(torture: Torture) -> None:
    """A's session dies once the branch began, before its BEGIN and debit reach it (they go
    together, docs/design.md §2; a reset, a restart): the transfer ABORTs."""
    settings = torture.settings
    coordinator = open_coordinator(settings, sessions=1)
    fired: list[int] = []

    def kill_a_session(name: str) -> None:  # the coordinator's own failpoint hook
        if name == "after_begin" and not fired:
            (tx,) = coordinator._active.values()
            branch: Any = tx.branches["a"]
            fired.append(_terminate_session(settings.pg_a, branch.conn.info.backend_pid))

    coordinator.failpoint = kill_a_session  # type: ignore[method-assign]
    try:
        transfer = scenario.Transfer(f"repro-{uuid.uuid4().hex[:8]}", "acc-00001", "acc-00002", 1)
        outcome, _ = transfer_2pc(coordinator, transfer)
    finally:
        coordinator.close()
    assert fired == [1] and outcome is Outcome.ABORTED


NO_VOTE_B = [
    "CREATE TABLE IF NOT EXISTS torture_no_vote (id int)",
    "CREATE OR REPLACE FUNCTION torture_no_vote() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(1); RAISE EXCEPTION 'no vote'; END $$",
    "DROP TRIGGER IF EXISTS torture_no_vote ON torture_no_vote",
    "CREATE CONSTRAINT TRIGGER torture_no_vote AFTER INSERT ON torture_no_vote "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION torture_no_vote()",
]


def test_abort_rolls_back_a_prepared_branch_whose_connection_broke(
    settings: Settings, tmp_path: Path
) -> None:
    """B votes NO after A prepared and A's session died: A's branch is still rolled back."""
    with psycopg.connect(settings.pg_b, autocommit=True) as conn:
        for statement in NO_VOTE_B:
            conn.execute(statement)
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS torture_side (id int)")

    def coordinator() -> Coordinator:
        return Coordinator(
            "tortrb",
            FileDecisionLog(tmp_path / "decisions.log"),
            [PostgresResource("a", settings.pg_a), PostgresResource("b", settings.pg_b)],
            recover_on_start=True,
        )

    first = coordinator()
    try:
        tx = first.begin()
        tx.execute("a", "INSERT INTO torture_side VALUES (1)")
        tx.execute("b", "INSERT INTO torture_no_vote VALUES (1)")  # NO at PREPARE, after 1 s
        pid = tx.branch("a").conn.info.backend_pid
        killer = threading.Timer(0.5, _terminate_pid, (settings.pg_a, pid))
        killer.start()  # A is prepared by then; its session dies
        outcome = tx.commit()
        killer.join()
        left = PostgresResource("a", settings.pg_a)
        try:
            prepared = [x.gtrid for x in left.recover(FORMAT_ID, "tortrb.")]
        finally:
            left.close()
    finally:
        first.close()
        coordinator().close()  # its start-up recovery rolls back what was left
    assert outcome is Outcome.ABORTED
    assert prepared == []
