"""Prometheus metrics: counted as transactions finish, read from the servers at each scrape,
served on /metrics by 'twopc consumer' with TWOPC_METRICS_PORT; the alert rules use them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from coordinator.aio import AsyncCoordinator
from coordinator.backlog import Resolved
from coordinator.coordinator import Coordinator
from coordinator.errors import TransactionInDoubt
from coordinator.metrics import PreparedCapacity, Readings, TransactionMetrics
from coordinator.xid import Xid
from participants.aio.fake import AsyncFakeBroker, AsyncFakeResource
from participants.postgres import PostgresResource
from scenarios import metrics
from scenarios.config import Settings
from scenarios.outbox.failures import OutMessage
from scenarios.outbox.relay import StompPublisher
from scenarios.transfer import model as scenario
from scenarios.wiring import COORDINATOR_OBSERVERS, open_async_coordinator, open_coordinator
from tests.cli_process import stopped
from tests.conftest import free_port
from tests.test_outcomes_final import STORIES, Servers

TWOPC = [sys.executable, "-m", "scenarios.cli"]
ALERTS = Path(__file__).resolve().parent.parent / "docs" / "alerts.yml"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics: every sample by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_alert_rules_parse_and_use_only_exported_metrics() -> None:
    """docs/alerts.yml is valid rule YAML, alerts on in-doubt and prepared age, and every
    metric its expressions name is one twopc exports."""
    rules = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert {"TwopcInDoubt", "TwopcPreparedTooOld"} <= {rule["alert"] for rule in rules}
    named = {name for rule in rules for name in re.findall(r"\btwopc_\w+", rule["expr"])}
    assert named and named <= set(metrics.METRIC_NAMES)
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}


@pytest.fixture
def probe_tables(settings: Settings) -> Iterator[str]:
    """A table 'metrics_probe' in A and in B for the test's writes."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS metrics_probe (x int)")
    yield "metrics_probe"


@pytest.mark.lab
def test_transactions_phases_and_forced_writes_are_counted(
    settings: Settings, probe_tables: str
) -> None:
    """With /metrics served, a coordinator from wiring counts its commits and aborts, the
    phase times and the decision log's forced writes."""
    server = metrics.serve(settings, 0, address="127.0.0.1")
    coordinator = open_coordinator(settings, sessions=2)
    try:
        for _ in range(3):
            with coordinator.transaction() as tx:  # no broker: the COMMIT record is forced
                tx.execute("a", "INSERT INTO metrics_probe VALUES (1)")
                tx.execute("b", "INSERT INTO metrics_probe VALUES (1)")
        tx = coordinator.begin()
        tx.execute("a", "INSERT INTO metrics_probe VALUES (2)")
        tx.rollback()
        samples = scrape(server.port)
    finally:
        coordinator.close()
        server.close()
    cid = settings.coordinator_id
    assert value(samples, "twopc_transactions_total", coordinator=cid, outcome="committed") == 3
    assert value(samples, "twopc_transactions_total", coordinator=cid, outcome="aborted") == 1
    assert value(samples, "twopc_phase_seconds_count", coordinator=cid, phase="prepare") == 3
    assert value(samples, "twopc_phase_seconds_sum", coordinator=cid, phase="phase2") > 0
    forced = value(samples, "twopc_decision_log_forced_writes_total", coordinator=cid)
    assert forced >= 3
    assert server.transactions.observe not in COORDINATOR_OBSERVERS  # close() unhooks


@pytest.mark.lab
def test_an_asyncio_coordinator_from_wiring_is_counted_too(
    settings: Settings, probe_tables: str
) -> None:
    """The asyncio coordinator open_async_coordinator opens is observed as the threaded one
    is: its commits, aborts and phases, scraped while it runs (its participants read from
    the scrape's thread, off the event loop)."""
    server = metrics.serve(settings, 0, address="127.0.0.1")

    async def run() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with open_async_coordinator(settings, sessions=2) as coordinator:
            for _ in range(3):
                async with coordinator.transaction() as tx:
                    await tx.execute("a", "INSERT INTO metrics_probe VALUES (1)")
                    await tx.execute("b", "INSERT INTO metrics_probe VALUES (1)")
            tx = coordinator.begin()
            await tx.execute("a", "INSERT INTO metrics_probe VALUES (2)")
            await tx.rollback()
            return await asyncio.to_thread(scrape, server.port)

    try:
        samples = asyncio.run(run())
    finally:
        server.close()
    cid = settings.coordinator_id
    assert value(samples, "twopc_transactions_total", coordinator=cid, outcome="committed") == 3
    assert value(samples, "twopc_transactions_total", coordinator=cid, outcome="aborted") == 1
    assert value(samples, "twopc_phase_seconds_count", coordinator=cid, phase="prepare") == 3
    assert value(samples, "twopc_source_up", source="database a") == 1


@pytest.mark.lab
def test_prepared_branches_their_age_headroom_and_in_doubt_are_read_live(
    settings: Settings, probe_tables: str
) -> None:
    """A branch left prepared shows in the prepared count, the oldest age, the headroom and
    (past the in-doubt age) the in-doubt count; resolved, the figures go back."""
    collector = TransactionMetrics(CollectorRegistry(), in_doubt_after=0.2)
    watched = [PostgresResource("a", settings.pg_a), PostgresResource("b", settings.pg_b)]
    collector.watch(watched, metrics.MarkerQueue(settings))
    before = collector.read().gauges
    resource = PostgresResource("a", settings.pg_a)
    xid = Xid.branch(f"{settings.coordinator_id}.metrics-{os.getpid()}", "a")
    branch = resource.begin(xid)
    try:
        branch.execute("INSERT INTO metrics_probe VALUES (3)")
        branch.prepare()
        branch.release()
        time.sleep(0.5)
        during = collector.read()
    finally:
        assert resource.rollback_recovered(xid)
        resource.close()
    after = collector.read().gauges
    for watched_resource in watched:
        watched_resource.close()

    def a(gauges: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
        return next(v for labels, v in gauges[name] if labels.get("database") == "a")

    assert during.up == {"database a": True, "database b": True, "broker": True}
    assert a(during.gauges, "twopc_prepared_branches") == a(before, "twopc_prepared_branches") + 1
    assert a(during.gauges, "twopc_oldest_prepared_age_seconds") >= 0.5
    assert a(during.gauges, "twopc_prepared_headroom") == a(before, "twopc_prepared_headroom") - 1
    assert during.gauges["twopc_in_doubt_transactions"][0][1] >= 1
    assert a(after, "twopc_prepared_branches") == a(before, "twopc_prepared_branches")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


class KeepsListener:
    """A coordinator as the collector sees it, keeping the listener the collector adds."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self.listener: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.coordinator, name)

    def add_listener(self, listener: Any) -> None:
        self.listener = listener
        self.coordinator.add_listener(listener)


@pytest.mark.parametrize("api", ["thread", "asyncio"])
def test_library_collector_counts_what_the_backlog_resolved_once(api: str) -> None:
    """Either coordinator feeds the library collector: a commit point with no receipt
    counts as in-doubt, its later resolution once under twopc_resolved_total (a repeat
    report is not counted again), and the fakes' prepared branches are read at scrape."""
    fault, broker, told, resolved, chore = STORIES["marker, committed, no receipt"]
    servers = Servers(fault, broker)
    registry = CollectorRegistry()
    collector = TransactionMetrics(registry)
    heard: list[Resolved] = []
    if api == "thread":
        coordinator: Any = Coordinator(
            "t1",
            servers.log,
            list(servers.res.values()),
            servers.broker,
            housekeeping_interval=None,
        )
        collector.observe(seen := KeepsListener(coordinator))
        coordinator.add_listener(lambda r, _: heard.append(r) if isinstance(r, Resolved) else None)
        try:
            with pytest.raises(TransactionInDoubt), coordinator.transaction() as tx:
                tx.execute("a", "debit")
                tx.execute("b", "credit")
                tx.send("/queue/transfers", "{}")
            assert getattr(coordinator, chore)() == 1
            readings = collector.read()
        finally:
            coordinator.close()
    else:
        coordinator = AsyncCoordinator(
            "t1",
            servers.log,
            [AsyncFakeResource(r) for r in servers.res.values()],
            AsyncFakeBroker(servers.broker) if servers.broker is not None else None,
            housekeeping_interval=None,
        )
        collector.observe(seen := KeepsListener(coordinator))
        coordinator.add_listener(lambda r, _: heard.append(r) if isinstance(r, Resolved) else None)

        async def scenario() -> Readings:
            async with coordinator:
                with pytest.raises(TransactionInDoubt):
                    async with coordinator.transaction() as tx:
                        await tx.execute("a", "debit")
                        await tx.execute("b", "credit")
                        await tx.send("/queue/transfers", "{}")
                assert await getattr(coordinator, chore)() == 1
                return await asyncio.to_thread(collector.read)

        readings = asyncio.run(scenario())
    seen.listener(heard[0], heard[0].outcome)  # the collector told the same resolution again
    assert (
        sample(registry, "twopc_transactions_total", coordinator="t1", outcome=told[0].value) == 1
    )
    assert sample(registry, "twopc_transactions_total", coordinator="t1", outcome="committed") == 0
    assert (
        sample(
            registry,
            "twopc_resolved_total",
            coordinator="t1",
            was=told[0].value,
            outcome=resolved.value,
        )
        == 1
    )
    assert readings.up == {"database a": True, "database b": True, "broker": True}
    assert {labels["database"] for labels, _ in readings.gauges["twopc_prepared_branches"]} == {
        "a",
        "b",
    }


def test_library_metrics_import_no_scenario_and_no_prometheus_until_used() -> None:
    """coordinator.metrics imports prometheus-client only when a collector is made, and no
    scenario or participant module at all."""
    code = (
        "import sys, coordinator.metrics; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('prometheus_client', 'scenarios', 'participants')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def wait_for(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


@pytest.mark.lab
def test_consumer_serves_live_metrics(settings: Settings) -> None:
    """'twopc consumer' with TWOPC_METRICS_PORT serves /metrics: the applied count rises by
    the credit commands sent, and the servers' figures are there and up."""
    scenario.reset(settings, accounts=10, balance=1_000)
    port = free_port()
    env = {**os.environ, "TWOPC_METRICS_PORT": str(port)}
    consumer = subprocess.Popen(
        [*TWOPC, "consumer"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: scrape(port))
        before = scrape(port)
        applied = value(
            before, "twopc_consumer_messages_total", consumer="consumer", outcome="applied"
        )
        publisher = StompPublisher(settings)
        sent = [
            scenario.Transfer(
                f"metrics-{os.getpid()}-{i}", scenario.account_id(0), scenario.account_id(1), 1
            )
            for i in range(5)
        ]
        publisher.publish(
            [OutMessage(t.transfer_id, scenario.CREDIT_QUEUE, t.body()) for t in sent]
        )
        publisher.close()

        def rose() -> bool:
            now = value(
                scrape(port),
                "twopc_consumer_messages_total",
                consumer="consumer",
                outcome="applied",
            )
            return now == applied + 5

        wait_for(rose)
        after = scrape(port)
    finally:
        consumer.send_signal(signal.SIGTERM)
        output = stopped(consumer)[0].decode()
    assert consumer.returncode == 0, output
    for source in ("database a", "database b", "broker"):
        assert value(after, "twopc_source_up", source=source) == 1
    assert value(after, "twopc_max_prepared_transactions", database="b") == 200
    assert value(after, "twopc_consumer_queue_depth") == 0
    assert ("twopc_marker_queue_depth", ()) in after
    assert "applied 5" in output


def test_metrics_port_setting_is_read_and_checked(tmp_path: Path) -> None:
    """TWOPC_METRICS_PORT is read into the settings; a value that is not a port is refused
    with its name."""
    from coordinator.errors import ConfigurationError

    env = {
        "TWOPC_HOME": str(tmp_path),
        "TWOPC_PG_A": "host=127.0.0.1 port=5432 dbname=a",
        "TWOPC_PG_B": "host=127.0.0.1 port=5432 dbname=b",
        "TWOPC_STOMP": "127.0.0.1:61613",
        "TWOPC_OPENWIRE": "127.0.0.1:61616",
    }
    assert Settings.load(env).metrics_port is None
    assert Settings.load({**env, "TWOPC_METRICS_PORT": "9464"}).metrics_port == 9464
    for bad in ("http", "0", "70000"):
        with pytest.raises(ConfigurationError, match="TWOPC_METRICS_PORT"):
            Settings.load({**env, "TWOPC_METRICS_PORT": bad})


@pytest.mark.lab
@pytest.mark.parametrize("source", ["dsn", "pool"])
def test_prepared_capacity_of_an_asyncio_resource_is_read_off_the_loop(
    settings: Settings, source: str
) -> None:
    """An AsyncPostgresResource's synchronous view (over a DSN, or over a pool whose reads
    run on the loop) reports the server's max_prepared_transactions and its prepared count
    to the collector's thread."""
    from psycopg_pool import AsyncConnectionPool

    from participants.aio.postgres import AsyncPostgresResource

    async def scenario() -> PreparedCapacity:
        if source == "dsn":
            resource = AsyncPostgresResource("b", settings.pg_b)
            view = resource.recovery_resource()
            try:
                return await asyncio.to_thread(view.prepared_capacity)  # type: ignore[attr-defined]
            finally:
                await resource.close()
                view.close()
        async with AsyncConnectionPool(settings.pg_b, min_size=1, max_size=2, open=False) as pool:
            resource = AsyncPostgresResource("b", pool)
            view = resource.recovery_resource()
            try:
                return await asyncio.to_thread(view.prepared_capacity)  # type: ignore[attr-defined]
            finally:
                await resource.close()

    capacity = asyncio.run(scenario())
    assert capacity.max_prepared == 200
    assert 0 <= capacity.prepared <= capacity.max_prepared
    assert capacity.now.tzinfo is not None


def test_a_participant_that_cannot_be_read_shows_as_down() -> None:
    """A database the scrape cannot reach is twopc_source_up 0 and its figures are left
    out; the scrape itself still answers."""
    registry = CollectorRegistry()
    collector = TransactionMetrics(registry)
    unreachable = PostgresResource(
        "x", f"host=127.0.0.1 port={free_port()} dbname=x", pool_size=0, connect_timeout=1.0
    )
    collector.watch([unreachable])
    try:
        assert sample(registry, "twopc_source_up", source="database x") == 0
        assert sample(registry, "twopc_prepared_branches", database="x") is None
        assert sample(registry, "twopc_in_doubt_transactions") == 0
    finally:
        unreachable.close()
