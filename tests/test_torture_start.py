"""The crash torture starts from what a killed run left: its dead peers' prepared branches are
recovered before the reset, and what no recovery resolves stops the start with a clear error."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import replace

import psycopg
import pytest

from coordinator.xid import FORMAT_ID
from scenarios.config import Settings
from scenarios.torture.runner import Torture, TortureSetupFailed, peer_id

pytestmark = pytest.mark.lab

#: A peer of a multi-coordinator schedule that prepares A in a transfer and is killed.
KILLED_PEER = """
import os
from scenarios.config import Settings
from scenarios.wiring import open_coordinator
from scenarios.transfer.model import DEBIT_TO
coordinator = open_coordinator(Settings.load(), sessions=1)
tx = coordinator.begin(os.environ["GTRID"])
a = tx.branch("a")
a.defer(DEBIT_TO, {"amount": 1, "tid": "left", "account": "acc-00000", "counterparty": "acc-00001"})
a.prepare_now()
os._exit(9)
"""


def prepared(settings: Settings, *gtrids: str) -> int:
    """How many branches of ``gtrids`` are prepared in A and B."""
    total = 0
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            total += sum(1 for xid in conn.tpc_recover() if xid.gtrid in gtrids)
    return total


def test_a_killed_peers_prepared_branch_is_recovered_before_the_reset(settings: Settings) -> None:
    """A torture peer (postgres decisions) killed with A prepared on an account row: the next
    torture's start recovers it as a dead peer, resets, and nothing stays prepared."""
    with Torture(settings, accounts=10):  # the tables reset, whatever an earlier test left
        pass
    peer = replace(settings, coordinator_id=peer_id(0), decisions="postgres")
    gtrid = f"{peer_id(0)}.{secrets.token_hex(6)}-000001"
    env = {**os.environ, **peer.as_env(), "GTRID": gtrid}
    done = subprocess.run([sys.executable, "-c", KILLED_PEER], env=env, timeout=120, check=False)
    assert done.returncode == 9
    assert prepared(settings, gtrid) == 1
    with Torture(settings, accounts=10):
        assert prepared(settings, gtrid) == 0


def test_a_prepared_branch_no_recovery_resolves_stops_the_start(settings: Settings) -> None:
    """A branch prepared on an account row under a coordinator that never registered: the
    start's reset times out on its lock, and the start raises TortureSetupFailed naming its
    gtrid and what to run; a prepared branch on another table does not stop the start."""
    with Torture(settings, accounts=10):  # the tables reset, whatever an earlier test left
        pass
    gtrid = f"gone-{secrets.token_hex(3)}.{secrets.token_hex(6)}-000002"
    elsewhere = f"gone-{secrets.token_hex(3)}.{secrets.token_hex(6)}-000003"
    for xid_gtrid, statement in (
        (gtrid, "UPDATE accounts SET balance = balance WHERE id = 'acc-00000'"),
        (elsewhere, "SELECT 1"),
    ):
        conn = psycopg.connect(settings.pg_a)
        conn.tpc_begin(conn.xid(FORMAT_ID, xid_gtrid, "a"))
        conn.execute(statement)
        conn.tpc_prepare()
        conn.close()  # the branch stays prepared
    try:
        with pytest.raises(TortureSetupFailed) as refused:
            Torture(settings, accounts=10).__enter__()
        message = str(refused.value)
        assert f"a: {gtrid}" in message and "'twopc recover --dead'" in message
        assert "ROLLBACK PREPARED" in message
        with psycopg.connect(settings.pg_a, autocommit=True) as conn:
            conn.tpc_rollback(conn.xid(FORMAT_ID, gtrid, "a"))
        with Torture(settings, accounts=10):  # only the branch on another table is left
            assert prepared(settings, gtrid, elsewhere) == 1
    finally:
        with psycopg.connect(settings.pg_a, autocommit=True) as conn:
            for xid in conn.tpc_recover():
                if xid.gtrid in (gtrid, elsewhere):
                    conn.tpc_rollback(xid)
    assert prepared(settings, gtrid, elsewhere) == 0
