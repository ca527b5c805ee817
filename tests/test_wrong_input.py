"""Wrong input on the real lab: a transfer that names a missing account never creates money."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import psycopg
import pytest

from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.strategies import new_strategy
from scenarios.transfer import model as scenario
from scenarios.transfer.invariants import gather_evidence
from scenarios.wiring import open_coordinator

pytestmark = pytest.mark.lab

TWOPC = [sys.executable, "-m", "scenarios.cli"]


def twopc(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI with the lab's settings."""
    env = {**os.environ, **settings.as_env()}
    return subprocess.run(
        [*TWOPC, *args], capture_output=True, text=True, env=env, check=False, timeout=300
    )


def test_transfers_beyond_the_reset_accounts_abort_and_conserve_money(settings: Settings) -> None:
    """Reset with 20 accounts, transfer with --accounts 100: missing accounts abort, money holds."""
    reset = twopc(settings, "transfer", "--reset", "--accounts", "20")
    assert reset.returncode == 0, reset.stderr
    run = twopc(settings, "transfer", "--count", "30", "--accounts", "100", "--seed", "3", "--json")
    assert "Traceback" not in run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    output = json.loads(run.stdout)
    plan = scenario.plan(30, accounts=100, seed=3)
    missing = [t for t in plan if int(t.source[4:]) >= 20 or int(t.target[4:]) >= 20]
    assert missing and output["aborted"] >= len(missing)
    named = [r for r in output["abort_reasons"] if "does not exist in database" in r]
    assert named, output["abort_reasons"]
    accounts = {t.source for t in missing} | {t.target for t in missing}
    for reason in named:
        assert re.fullmatch(r"account (acc-\d{5}) does not exist in database [ab]", reason)
        assert reason.split()[1] in accounts and int(reason.split()[1][4:]) >= 20
    invariants = output["invariants"]
    assert invariants["ok"], invariants
    assert invariants["money_conserved"] and invariants["atomicity_violations"] == 0


def test_later_runs_use_the_account_count_stored_at_reset(settings: Settings) -> None:
    """After '--reset --accounts 20', 'transfer --count 30' plans over 20 accounts: none abort."""
    reset = twopc(settings, "transfer", "--reset", "--accounts", "20")
    assert reset.returncode == 0, reset.stderr
    assert scenario.stored_accounts(settings) == 20
    run = twopc(settings, "transfer", "--count", "30", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    output = json.loads(run.stdout)
    assert output["committed"] + output["aborted"] == 30
    assert not any("does not exist" in str(r) for r in output["abort_reasons"])
    assert output["invariants"]["ok"], output["invariants"]


@pytest.fixture
def twenty(settings: Settings) -> Settings:
    """Tables reset (recovery first) with 20 accounts of 1,000 in A and B."""
    open_coordinator(settings).close()
    scenario.reset(settings, accounts=20, balance=1_000)
    return settings


def balances(settings: Settings) -> tuple[int, int, int, int]:
    """Sum of balances and transfers rows in A, then in B."""
    sums = []
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT (SELECT sum(balance) FROM accounts), (SELECT count(*) FROM transfers)"
            ).fetchone()
            assert row is not None
            sums.extend(int(v) for v in row)
    return sums[0], sums[1], sums[2], sums[3]


@pytest.mark.parametrize("name", ["2pc", "outbox-status", "outbox-last-id", "cdc", "naive"])
@pytest.mark.parametrize(
    ("source", "target", "database"),
    [("acc-00042", "acc-00001", "a"), ("acc-00001", "acc-00042", "b")],
    ids=["missing in A", "missing in B"],
)
def test_every_strategy_rejects_a_missing_account_before_anything_is_applied(
    twenty: Settings, name: str, source: str, target: str, database: str
) -> None:
    """Each strategy aborts a transfer naming a missing account, and nothing changes anywhere."""
    before = balances(twenty)
    strategy = new_strategy(name)
    strategy.prepare(twenty, concurrency=1)
    try:
        transfer = scenario.Transfer(f"missing-{name}-{database}", source, target, 5)
        outcome, reason = strategy.run_one(transfer)
    finally:
        strategy.close()
    assert outcome is Outcome.ABORTED
    assert reason == f"account acc-00042 does not exist in database {database}"
    assert balances(twenty) == before
    evidence = gather_evidence(twenty, inbox=strategy.relay_mode is not None)
    shown = evidence.as_dict()
    assert shown["messages_on_queue"] == 0 and evidence.ok, shown


def test_missing_account_names_the_account_and_the_database() -> None:
    """MissingAccount's message names both, and require_applied raises it for 0 rows only."""
    error = scenario.MissingAccount("acc-00042", "b")
    assert str(error) == "account acc-00042 does not exist in database b"
    assert (error.account, error.database) == ("acc-00042", "b")
    scenario.require_applied(1, "acc-00001", "a")
    with pytest.raises(scenario.MissingAccount, match=r"^account acc-00007 does not exist in"):
        scenario.require_applied(0, "acc-00007", "a")
