"""The CLI's smaller edges: what a run that meets a broken lab says and prints.

A dropped table mid-way, a database that stops answering, a CA file that is not
PEM, ``--no-check`` with ``--no-pipeline``: each reaches the user as the run's
results (when there are any) and one line naming the setting and what to do.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from coordinator.errors import ConfigurationError
from participants.aio.stomp import AsyncStompClient
from participants.stomp_client import StompClient
from scenarios.config import Settings
from scenarios.lab.proxy import FaultProxy
from scenarios.lab.services import Lab
from scenarios.outbox.deadletter import dead_letter_queue
from scenarios.transfer.model import CREDIT_QUEUE, drain, recover_and_reset
from scenarios.wiring import open_stomp
from tests.cli_process import Running, count_rows
from tests.test_cli_errors import RESET_HINT, assert_one_line_error, twopc

pytestmark = pytest.mark.lab


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The lab's settings, a state folder of the test's own; tables reset before and after."""
    recover_and_reset(settings, accounts=100, balance=10_000)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    base = {k: v for k, v in os.environ.items() if k != "TWOPC_LOG_LEVEL"}
    yield {**base, **settings.as_env(), "TWOPC_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    recover_and_reset(settings, accounts=100, balance=10_000)


def test_a_transfer_that_meets_a_dropped_table_says_to_reset(
    settings: Settings, env: dict[str, str]
) -> None:
    """A table dropped after the command's own check: one line naming the database and the reset."""
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        conn.execute("DROP TABLE transfers")
    done = twopc(env, "transfer", "--count", "5", "--accounts", "100")
    assert_one_line_error(done, 1, "database a", "TWOPC_PG_A", "transfers", RESET_HINT)


@pytest.fixture
def b_through_proxy(
    settings: Settings, env: dict[str, str]
) -> Iterator[tuple[FaultProxy, dict[str, str]]]:
    """A fault proxy in front of database B, and ``env`` pointing TWOPC_PG_B at it."""
    info = psycopg.conninfo.conninfo_to_dict(settings.pg_b)
    with FaultProxy(f"{info['host']}:{info['port']}", name="pg-b") as proxy:
        dsn = psycopg.conninfo.make_conninfo(
            settings.pg_b, host="127.0.0.1", port=proxy.port, connect_timeout=2
        )
        yield proxy, {**env, "TWOPC_PG_B": dsn}
        proxy.heal(reset=True)


@pytest.mark.parametrize(
    "after",
    [
        # while the writers run: the convergence wait's connection to B times out
        "SELECT count(*) >= 1 FROM outbox",
        # once A has every write: the wait is polling B on an open connection
        "SELECT count(*) >= 100 FROM transfers",
    ],
    ids=["during the writes", "during the convergence wait"],
)
def test_a_database_that_stops_answering_names_it_and_the_run_still_prints_its_results(
    settings: Settings,
    b_through_proxy: tuple[FaultProxy, dict[str, str]],
    tmp_path: Path,
    after: str,
) -> None:
    """B blackholed mid-run: the batch's results print, then one line naming B and its setting."""
    proxy, env = b_through_proxy
    run = Running(
        env,
        tmp_path,
        "transfer",
        "--strategy",
        "outbox-status",
        "--no-pipeline",
        "--count",
        "100",
        "--concurrency",
        "2",
    )
    run.wait_for(lambda: count_rows(settings.pg_a, after) == 1, "A rows")
    proxy.blackhole()  # the writers only use A from here; the checks must reach B
    status = run.finish()
    assert status == 1, run.stdout + run.stderr
    assert "outbox-status: 100 committed" in run.stdout, run.stdout
    lines = [line for line in run.stderr.splitlines() if line.startswith("twopc: error: ")]
    assert len(lines) == 1, run.stderr
    for word in ("cannot connect to database b", "TWOPC_PG_B", "timeout", "twopc lab up"):
        assert word in lines[0], lines[0]
    assert "Traceback" not in run.stderr, run.stderr


# -- a certificate file that is not PEM -------------------------------------------------------


NOT_PEM_WORDS = ("TWOPC_STOMP_CA=", "no certificate in PEM", "twopc lab env")


@pytest.fixture
def not_pem(tmp_path: Path) -> str:
    """A file that exists but holds no certificate."""
    path = tmp_path / "not-a-certificate.pem"
    path.write_text("this is not a certificate\n")
    return str(path)


def test_a_ca_file_that_is_not_pem_stops_the_cli_with_one_line_naming_the_setting(
    env: dict[str, str], lab: Lab, not_pem: str
) -> None:
    """TWOPC_STOMP_CA pointing at a non-PEM file: exit 1, one line naming the setting."""
    tls = {
        "TWOPC_STOMP": f"127.0.0.1:{lab.ports.stomp_tls}",
        "TWOPC_STOMP_TLS": "1",
        "TWOPC_STOMP_CA": not_pem,
    }
    done = twopc({**env, **tls}, "transfer", "--count", "1", "--accounts", "100")
    assert_one_line_error(done, 1, *NOT_PEM_WORDS)


def test_a_ca_file_that_is_not_pem_is_a_configuration_error_in_the_sync_and_asyncio_clients(
    lab: Lab, not_pem: str
) -> None:
    """StompClient and AsyncStompClient refuse a non-PEM CA file naming TWOPC_STOMP_CA."""
    address = f"127.0.0.1:{lab.ports.stomp_tls}"
    with pytest.raises(ConfigurationError) as sync_error:
        StompClient.open(address, tls=True, ca_file=not_pem, connect_timeout=2.0)

    async def open_async() -> None:
        await AsyncStompClient.open(address, tls=True, ca_file=not_pem, connect_timeout=2.0)

    with pytest.raises(ConfigurationError) as async_error:
        asyncio.run(open_async())
    for error in (sync_error, async_error):
        for word in NOT_PEM_WORDS:
            assert word in str(error.value)


def test_no_check_with_no_pipeline_does_not_wait_for_b(env: dict[str, str]) -> None:
    """--no-check --no-pipeline ends once A has its writes: no wait for B, no error, exit 0."""
    done = twopc(
        env,
        "transfer",
        "--strategy",
        "outbox-status",
        "--no-pipeline",
        "--no-check",
        "--count",
        "5",
        "--converge-timeout",
        "30",
        "--json",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    output = json.loads(done.stdout)
    assert output["committed"] == 5
    assert "not_converged" not in output and "invariants" not in output


# -- browsing the dead letters ------------------------------------------------------------------


def test_outbox_failed_leaves_no_browse_sentinel_on_the_dead_letter_queue(
    settings: Settings, env: dict[str, str]
) -> None:
    """Listing the dead letters twice leaves the queue as it was: the letters, no sentinel."""
    dlq = dead_letter_queue(CREDIT_QUEUE)
    drain(settings, dlq)
    with open_stomp(settings) as client:
        client.send(dlq, "{}", {"transfer-id": "dead-1"}, receipt_timeout=5)
    for _ in range(2):
        listed = twopc(env, "outbox", "failed", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [d["transfer_id"] for d in json.loads(listed.stdout)["dead_letters"]] == ["dead-1"]
    with open_stomp(settings) as client:
        left = client.browse(dlq)
    assert [m.headers.get("transfer-id") for m in left] == ["dead-1"]
    assert not any(m.is_sentinel for m in left)
    drain(settings, dlq)
