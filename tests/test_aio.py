"""The asyncio API on the real lab: commit, abort, crash and recovery, the ASGI example."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator import FileDecisionLog, TransactionAborted, TransactionTimeout, events
from coordinator.aio import AsyncCoordinator
from coordinator.failpoints import failpoint_env
from coordinator.log.memory import MemoryDecisionLog
from coordinator.states import TxState
from participants.aio.activemq import AsyncActiveMQ
from participants.aio.fake import AsyncFakeBroker, AsyncFakeResource
from participants.aio.postgres import AsyncPostgresResource
from participants.fake import FakeBroker, FakeResource, FakeStore
from scenarios.bench import inflight
from scenarios.config import Settings
from tests.asgi_client import AsgiClient
from tests.chores import FirstRoundBreaks
from tests.conftest import open_stomp_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
SCHEMA = "CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, amount integer NOT NULL)"


def rows(dsn: str, table: str, key: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT id, amount FROM {table} WHERE id = %s", (key,)).fetchall()


def prepared(dsn: str, prefix: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [x.gtrid for x in conn.tpc_recover() if x.gtrid.startswith(prefix)]


def coordinator_over(settings: Settings, log: Path, cid: str) -> AsyncCoordinator:
    """An AsyncCoordinator over the lab's two databases and its broker."""
    return AsyncCoordinator(
        cid,
        FileDecisionLog(str(log)),
        [AsyncPostgresResource("a", settings.pg_a), AsyncPostgresResource("b", settings.pg_b)],
        AsyncActiveMQ(settings.stomp, cid, **settings.stomp_options()),
    )


def example_app(coordinator: AsyncCoordinator) -> Any:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import asgi_app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(EXAMPLES))
    return asgi_app.create_app(coordinator)


@pytest.mark.lab
def test_asgi_example_commits_and_aborts_on_the_lab(settings: Settings, tmp_path: Path) -> None:
    """The ASGI example commits an order in both databases and its event on the broker;
    a duplicate aborts everywhere."""
    cid = f"aio{secrets.token_hex(3)}"
    order = {"id": f"o-{secrets.token_hex(4)}", "amount": 5}

    async def scenario() -> list[tuple[int, Any]]:
        coordinator = coordinator_over(settings, tmp_path / "decisions.log", cid)
        async with AsgiClient(example_app(coordinator)) as client:
            first = await client.post("/orders", order)
            again = await client.post("/orders", order)  # duplicate key in a: votes NO
        return [first, again]

    (status, body), (dup_status, dup_body) = asyncio.run(scenario())
    assert status == 201 and body["outcome"] == "committed"
    assert dup_status == 409 and dup_body["outcome"] == "aborted"
    assert rows(settings.pg_a, "orders", order["id"]) == [(order["id"], 5)]
    assert rows(settings.pg_b, "stock_moves", order["id"]) == [(order["id"], -5)]
    assert prepared(settings.pg_a, cid + ".") == [] and prepared(settings.pg_b, cid + ".") == []
    with open_stomp_client(settings.stomp) as client:
        events = [m for m in client.browse("/queue/orders") if order["id"] in m.body]
    assert [json.loads(m.body) for m in events] == [order]  # the committed one only


@pytest.mark.lab
def test_exception_in_the_block_rolls_back_both_branches(
    settings: Settings, tmp_path: Path
) -> None:
    """An exception inside ``async with coordinator.transaction()`` leaves nothing anywhere."""
    cid = f"aio{secrets.token_hex(3)}"
    key = f"x-{secrets.token_hex(4)}"

    async def scenario() -> None:
        coordinator = coordinator_over(settings, tmp_path / "decisions.log", cid)
        async with coordinator:
            async with coordinator.transaction() as tx:
                await tx.execute("a", SCHEMA.format(table="orders"))
                await tx.execute("b", SCHEMA.format(table="stock_moves"))
            with pytest.raises(RuntimeError, match="changed my mind"):
                async with coordinator.transaction() as tx:
                    await tx.execute("a", "INSERT INTO orders VALUES (%s, 1)", (key,))
                    await tx.execute("b", "INSERT INTO stock_moves VALUES (%s, -1)", (key,))
                    raise RuntimeError("changed my mind")
            with pytest.raises(TransactionAborted, match="voted NO"):
                async with coordinator.transaction() as tx:
                    await tx.execute("b", "INSERT INTO stock_moves VALUES (%s, -1)", (key,))
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        await tx.execute("a", "SELECT 1 / 0")
            assert coordinator.stats()["aborted"] == 2

    asyncio.run(scenario())
    assert (
        rows(settings.pg_a, "orders", key) == [] and rows(settings.pg_b, "stock_moves", key) == []
    )


SERVICE = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    sys.path[:0] = [os.environ["EXAMPLES"], os.environ["ROOT"]]
    from coordinator import failpoints
    from scenarios.config import Settings
    from tests.asgi_client import AsgiClient
    from tests.test_aio import coordinator_over
    import asgi_app

    async def main():
        failpoints.arm_from_env()  # as twopc's own processes do (scenarios/wiring.py)
        log = Path(os.environ["ORDERS_LOG"])
        coordinator = coordinator_over(Settings.load(), log, os.environ["CID"])
        async with AsgiClient(asgi_app.create_app(coordinator)) as client:
            print(await client.post("/orders", {"id": os.environ["ORDER"], "amount": 7}))

    asyncio.run(main())
    """
)


@pytest.mark.lab
@pytest.mark.parametrize(
    # The app's start-up transaction (its schema, on a and b) passes each failpoint first.
    ("failpoint", "committed"),
    [
        ("after_prepare=kill@4", False),
        ("before_broker_commit=kill", False),
        ("after_broker_commit=kill", True),  # the COMMIT frame was written: the marker is in
        ("after_decision=kill@2", True),
    ],
)
def test_service_killed_mid_commit_is_recovered_at_restart(
    settings: Settings, tmp_path: Path, failpoint: str, committed: bool
) -> None:
    """The ASGI service SIGKILLed around its commit point (the broker's marker) is recovered
    at restart: rolled back before the broker's COMMIT, committed after it; none prepared."""
    cid = f"aio{secrets.token_hex(3)}"
    order = f"k-{secrets.token_hex(4)}"
    log = tmp_path / "decisions.log"
    env = {
        **os.environ,
        **failpoint_env(failpoint),
        "EXAMPLES": str(EXAMPLES),
        "ROOT": str(ROOT),
        "CID": cid,
        "ORDER": order,
        "ORDERS_LOG": str(log),
    }
    done = subprocess.run(
        [sys.executable, "-c", SERVICE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -9, done.stdout + done.stderr  # killed by its failpoint
    assert len(prepared(settings.pg_a, cid + ".")) == 1
    assert len(prepared(settings.pg_b, cid + ".")) == 1

    async def restart() -> Any:
        coordinator = coordinator_over(settings, log, cid)
        async with coordinator:
            return coordinator.last_recovery

    report = asyncio.run(restart())
    assert report is not None and report.resolved and len(report.items) == 1
    assert prepared(settings.pg_a, cid + ".") == [] and prepared(settings.pg_b, cid + ".") == []
    expected_a = [(order, 7)] if committed else []
    expected_b = [(order, -7)] if committed else []
    assert rows(settings.pg_a, "orders", order) == expected_a
    assert rows(settings.pg_b, "stock_moves", order) == expected_b


EMBED = EXAMPLES / "aio_embed.py"


def test_api_doc_shows_the_asyncio_example_as_it_runs() -> None:
    """docs/api.md's asyncio section holds docs/examples/aio_embed.py verbatim."""
    guide = (ROOT / "docs" / "api.md").read_text()
    section = guide.split("\n## asyncio: AsyncCoordinator\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert EMBED.read_text() in blocks


@pytest.mark.slow
def test_asyncio_examples_pass_mypy_strict() -> None:
    """The asyncio examples type-check under mypy --strict against the installed packages."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict", "--no-incremental"),
            *(str(EMBED), str(EXAMPLES / "asgi_app.py")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.lab
def test_asyncio_example_commits_atomically_on_the_lab(settings: Settings, tmp_path: Path) -> None:
    """The asyncio example (docs/api.md) commits its rows in both databases and its message."""
    env = {**os.environ, **settings.as_env()}
    done = subprocess.run(
        [sys.executable, str(EMBED)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.fullmatch(r"order ([0-9a-f]{32}): committed as (ashop\.[0-9a-f]+)\n", done.stdout)
    assert match, done.stdout
    order = match.group(1)
    for dsn, amount in ((settings.pg_a, -10), (settings.pg_b, 10)):
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT amount FROM shop_ledger WHERE id = %s", (order,)).fetchone()
        assert row == (amount,)
    with open_stomp_client(settings.stomp) as client:
        messages = client.browse("/queue/shop.orders", idle_timeout=5.0)
    assert [m.headers.get("order-id") for m in messages].count(order) == 1
    assert (tmp_path / "ashop-decisions.log").exists()


@pytest.mark.lab
@pytest.mark.parametrize("decisions", ["file", "postgres"])
def test_bench_inflight_commits_every_transaction_with_threads_and_with_tasks(
    settings: Settings, tmp_path: Path, decisions: str
) -> None:
    """twopc bench --inflight --quick commits all 200 transactions in every mode, with a
    thread per transaction in flight for the sync coordinator and none for asyncio (in one
    process or split over two, each its own coordinator), its decisions where
    TWOPC_DECISIONS says, and leaves none of the messages they sent on the broker."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "scenarios.cli", "bench", "--inflight", "--quick"),
            *("--json", "--out", str(tmp_path)),
        ],
        cwd=ROOT,
        env={**os.environ, **replace(settings, decisions=decisions).as_env()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    by_mode = {r["mode"]: r for r in json.loads(done.stdout)["inflight"]}
    threads, tasks, split = by_mode["threads"], by_mode["asyncio"], by_mode["asyncio-2"]
    assert threads["committed"] == tasks["committed"] == split["committed"] == 200
    assert threads["errors"] == tasks["errors"] == split["errors"] == 0
    assert threads["threads_in_flight"] >= 200 > tasks["threads_in_flight"]
    assert split["inflight"] == 200 > split["threads_in_flight"]
    assert {r["decisions"] for r in by_mode.values()} == {decisions}
    with open_stomp_client(settings.stomp) as client:
        assert client.browse(inflight.QUEUE, idle_timeout=2.0) == []  # nothing left behind
    rows = (tmp_path / "inflight.md").read_text().splitlines()
    assert [r.split(" |")[0] for r in rows if r.startswith("| ")][1:] == [
        "| threads",
        "| asyncio",
        "| asyncio-2",
    ]


def fake_coordinator(timeout: float = 30.0) -> tuple[AsyncCoordinator, FakeStore]:
    store = FakeStore()
    resources = [AsyncFakeResource(FakeResource(n, store)) for n in ("a", "b")]
    coordinator = AsyncCoordinator(
        "t1", MemoryDecisionLog(), resources, AsyncFakeBroker(FakeBroker("mq")), timeout=timeout
    )
    return coordinator, store


def test_watchdog_times_out_a_transaction_that_outlives_its_deadline() -> None:
    """The asyncio watchdog marks a late transaction timed out; its work is then refused
    and leaving the block raises TransactionTimeout, with nothing committed."""

    async def scenario() -> AsyncCoordinator:
        coordinator, _ = fake_coordinator(timeout=0.2)
        async with coordinator:
            with pytest.raises(TransactionTimeout, match="exceeded its timeout"):
                async with coordinator.transaction() as tx:
                    await tx.execute("a", "debit")
                    await asyncio.sleep(0.6)  # the watchdog wakes every 0.2 s
                    await tx.execute("b", "credit")
            assert tx.timed_out and tx.state is TxState.ABORTED
        return coordinator

    coordinator = asyncio.run(scenario())
    assert coordinator.stats()["aborted"] == 1 and coordinator.stats()["committed"] == 0


def test_cancelled_task_rolls_its_transaction_back() -> None:
    """A task cancelled inside the block rolls the transaction back, then is cancelled."""

    async def scenario() -> tuple[AsyncCoordinator, FakeStore, str]:
        coordinator, store = fake_coordinator()
        async with coordinator:
            entered = asyncio.Event()
            gtrid = ""

            async def request() -> None:
                nonlocal gtrid
                async with coordinator.transaction() as tx:
                    gtrid = tx.gtrid
                    await tx.execute("a", "debit")
                    entered.set()
                    await asyncio.sleep(10)

            task = asyncio.create_task(request())
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert coordinator.active == []
        return coordinator, store, gtrid

    coordinator, store, gtrid = asyncio.run(scenario())
    assert coordinator.stats()["aborted"] == 1
    assert gtrid not in store.committed and not store.prepared


def test_logging_that_raises_does_not_end_the_watchdog(logging_that_raises: list[str]) -> None:
    """With every log call of the asyncio watchdog raising, late transactions are still
    timed out and a chore that failed is still retried by the next round."""
    store = FakeStore()
    b = FakeResource("b", store)
    b.fail("commit_prepared", "error", times=3)  # phase 2 of b is deferred
    resources = [AsyncFakeResource(FakeResource("a", store)), AsyncFakeResource(b)]
    coordinator = AsyncCoordinator(
        "t1",
        MemoryDecisionLog(),
        resources,
        AsyncFakeBroker(FakeBroker("mq")),
        timeout=0.3,
        housekeeping_interval=0.2,
    )

    async def scenario() -> tuple[str, int]:
        async with coordinator:
            breaks = FirstRoundBreaks(coordinator.backlog)
            async with coordinator.transaction() as tx:
                await tx.execute("a", "debit")
                await tx.execute("b", "credit")
            for _ in range(2):  # the second shows the watchdog outlived the first's log call
                with pytest.raises(TransactionTimeout):
                    async with coordinator.transaction() as late:
                        await late.execute("a", "debit")
                        for _ in range(100):
                            if late.timed_out:
                                break
                            await asyncio.sleep(0.05)
                        await late.execute("b", "credit")
            for _ in range(100):
                if not store.prepared:
                    break
                await asyncio.sleep(0.05)
        return tx.gtrid, breaks.rounds

    gtrid, rounds = asyncio.run(scenario())
    assert not store.prepared and gtrid in store.committed and rounds >= 2
    assert logging_that_raises.count(events.TIMEOUT) == 2
    assert events.HOUSEKEEPING_FAILED in logging_that_raises
