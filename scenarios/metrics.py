"""Prometheus metrics of twopc (the ``metrics`` extra: prometheus-client), served on /metrics.

Two kinds of figures:

* counted in this process, as things happen: transactions by outcome
  (``twopc_transactions_total``), the time of each phase
  (``twopc_phase_seconds``, from ``Transaction.timings``), the decision log's
  forced writes, and what a relay or consumer running here did;
* read from the servers at each scrape, so that they show what a dead process
  left behind too: prepared branches and the oldest one's age per database,
  ``max_prepared_transactions`` and its headroom, transactions in doubt, the
  marker queue's depth, the relay's backlog and lag, the credit queue's depth
  and its oldest message's age (the consumer's lag), and the dead letters.

The coordinator core does not import this module; :func:`serve` hooks every
coordinator :mod:`scenarios.wiring` opens in this process. Long-running
commands serve it when ``TWOPC_METRICS_PORT`` is set, on
``TWOPC_METRICS_ADDRESS`` (default 127.0.0.1: this host only; 0.0.0.0 for every
interface).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.backlog import Resolved
from coordinator.coordinator import Coordinator
from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from coordinator.states import Outcome
from coordinator.transaction import Transaction
from coordinator.xid import FORMAT_ID
from participants.activemq import MARKER_QUEUE
from scenarios import wiring
from scenarios.config import Settings
from scenarios.config_values import METRICS_ADDRESS, METRICS_PORT
from scenarios.transfer.destinations import dead_letter_queue
from scenarios.transfer.model import CREDIT_QUEUE
from scenarios.transfer.schema import CDC_SLOT

#: A branch prepared for longer than this counts as in doubt: a live transaction
#: goes from PREPARE to COMMIT PREPARED in milliseconds, far below the default
#: transaction timeout (30 s) that this matches.
IN_DOUBT_AFTER = 30.0

#: The phases of ``Transaction.timings``: upper bounds of their histogram buckets (s).
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

#: Every metric name this module exports (docs/alerts.yml is checked against it).
METRIC_NAMES = (
    "twopc_transactions_total",
    "twopc_phase_seconds",
    "twopc_decision_log_forced_writes_total",
    "twopc_in_doubt_transactions",
    "twopc_prepared_branches",
    "twopc_oldest_prepared_age_seconds",
    "twopc_max_prepared_transactions",
    "twopc_prepared_headroom",
    "twopc_marker_queue_depth",
    "twopc_relay_pending_messages",
    "twopc_relay_lag_seconds",
    "twopc_cdc_slot_lag_bytes",
    "twopc_consumer_queue_depth",
    "twopc_consumer_lag_seconds",
    "twopc_dead_letters",
    "twopc_relay_messages_total",
    "twopc_consumer_messages_total",
    "twopc_source_up",
)


class TransactionMetrics:
    """What this process's coordinators did: outcomes, phase times, forced log writes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.transactions = Counter(
            "twopc_transactions",
            "Global transactions finished by this process, by outcome.",
            ["coordinator", "outcome"],
            registry=registry,
        )
        self.phases = Histogram(
            "twopc_phase_seconds",
            "Seconds a transaction spent in each phase of the commit sequence.",
            ["coordinator", "phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self._coordinators: list[Coordinator] = []
        self._lock = threading.Lock()
        registry.register(_Callback(self._forced_writes))

    def observe(self, coordinator: Coordinator) -> None:
        """Count ``coordinator``'s transactions and its log's forced writes from now on."""
        cid = coordinator.coordinator_id
        for outcome in Outcome:  # every outcome shows, at 0 until it happens
            self.transactions.labels(cid, outcome.value)

        def finished(tx: Transaction | Resolved, outcome: Outcome) -> None:
            if isinstance(tx, Resolved):
                return  # resolved later by the backlog: counted when its caller was told
            self.transactions.labels(cid, outcome.value).inc()
            for phase, seconds in tx.timings.items():
                self.phases.labels(cid, phase).observe(seconds)

        coordinator.add_listener(finished)
        with self._lock:
            self._coordinators.append(coordinator)

    def _forced_writes(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "twopc_decision_log_forced_writes",
            "fsyncs of the decision log since this process opened it.",
            labels=["coordinator"],
        )
        with self._lock:
            coordinators = list(self._coordinators)
        for coordinator in coordinators:
            with contextlib.suppress(Exception):  # a closed log: its count is gone
                family.add_metric([coordinator.coordinator_id], coordinator.log.forced_writes)
        yield family


class _Callback(Collector):
    """A collector whose metrics a function yields at each scrape."""

    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()


@dataclass
class ServerState:
    """What one scrape read from the servers (for the collector, and for tests)."""

    up: dict[str, bool] = field(default_factory=dict)
    gauges: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges.setdefault(name, []).append((labels, float(value)))


_HELP = {
    "twopc_in_doubt_transactions": "Global transactions with a branch prepared for longer "
    f"than {IN_DOUBT_AFTER:g} s (left for recovery: 'twopc indoubt', 'twopc recover').",
    "twopc_prepared_branches": "Prepared transactions of twopc's format in the database.",
    "twopc_oldest_prepared_age_seconds": "Age of the oldest prepared transaction in the "
    "database (pg_prepared_xacts.prepared against now()); 0 when none.",
    "twopc_max_prepared_transactions": "The database server's max_prepared_transactions.",
    "twopc_prepared_headroom": "max_prepared_transactions minus the server's prepared "
    "transactions: how many more can prepare.",
    "twopc_marker_queue_depth": "Commit markers on the marker queue.",
    "twopc_relay_pending_messages": "Outbox rows on A the status relay has not sent yet.",
    "twopc_relay_lag_seconds": "Age of the oldest outbox row not sent yet; 0 when none.",
    "twopc_cdc_slot_lag_bytes": "WAL bytes of A the CDC relay's slot has not confirmed.",
    "twopc_consumer_queue_depth": "Credit commands waiting on the consumer's queue.",
    "twopc_consumer_lag_seconds": "Age of the oldest credit command on the consumer's "
    "queue (its broker timestamp); 0 when none.",
    "twopc_dead_letters": "Messages on the dead-letter queue of the credit queue.",
}


class ServerCollector(Collector):
    """Reads the databases and the broker at each scrape; a source it cannot reach
    shows as ``twopc_source_up{source=...} 0`` and its figures are left out."""

    def __init__(self, settings: Settings, *, in_doubt_after: float = IN_DOUBT_AFTER) -> None:
        self.settings = settings
        self.in_doubt_after = in_doubt_after

    def collect(self) -> Iterator[Metric]:
        state = self.read()
        up = GaugeMetricFamily(
            "twopc_source_up", "1 if the last scrape could read the source.", labels=["source"]
        )
        for source, ok in state.up.items():
            up.add_metric([source], 1.0 if ok else 0.0)
        yield up
        for name, help_text in _HELP.items():
            values = state.gauges.get(name, [])
            labels = sorted({key for found, _ in values for key in found})
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for found, value in values:
                family.add_metric([found[key] for key in labels], value)
            yield family

    def read(self) -> ServerState:
        state = ServerState()
        gtrids: set[str] = set()
        for database, dsn in (("a", self.settings.pg_a), ("b", self.settings.pg_b)):
            try:
                gtrids |= self._read_database(state, database, dsn)
                state.up[f"database {database}"] = True
            except psycopg.Error:
                state.up[f"database {database}"] = False
        state.set("twopc_in_doubt_transactions", len(gtrids))
        try:
            self._read_broker(state)
            state.up["broker"] = True
        except TwoPhaseCommitError:
            state.up["broker"] = False
        return state

    def _read_database(self, state: ServerState, database: str, dsn: str) -> set[str]:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT current_setting('max_prepared_transactions')::int,"
                " (SELECT count(*) FROM pg_prepared_xacts)::int,"
                " clock_timestamp()"
            ).fetchone()
            assert row is not None
            max_prepared, prepared_on_server, now = row
            ours = [
                x
                for x in conn.tpc_recover()
                if x.format_id == FORMAT_ID and x.database in (None, conn.info.dbname)
            ]
            oldest = min((x.prepared for x in ours if x.prepared is not None), default=None)
            state.set("twopc_prepared_branches", len(ours), database=database)
            age = 0.0 if oldest is None else (now - oldest).total_seconds()
            state.set("twopc_oldest_prepared_age_seconds", max(age, 0.0), database=database)
            state.set("twopc_max_prepared_transactions", max_prepared, database=database)
            state.set(
                "twopc_prepared_headroom", max_prepared - prepared_on_server, database=database
            )
            if database == "a":
                self._read_relay(state, conn)
            return {
                x.gtrid
                for x in ours
                if x.prepared is not None
                and (now - x.prepared).total_seconds() > self.in_doubt_after
            }

    @staticmethod
    def _read_relay(state: ServerState, conn: psycopg.Connection[Any]) -> None:
        """The status relay's backlog and the CDC slot's lag, where the tables exist."""
        if conn.execute("SELECT to_regclass('outbox') IS NOT NULL").fetchone() == (True,):
            row = conn.execute(
                "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() -"
                " min(created_at)), 0)::float8 FROM outbox WHERE status = 'pending'"
            ).fetchone()
            assert row is not None
            state.set("twopc_relay_pending_messages", row[0])
            state.set("twopc_relay_lag_seconds", row[1])
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (CDC_SLOT,),
        ).fetchone()
        if row is not None and row[0] is not None:
            state.set("twopc_cdc_slot_lag_bytes", row[0])

    def _read_broker(self, state: ServerState) -> None:
        with wiring.open_stomp(self.settings, participant="metrics") as client:
            markers = client.browse(MARKER_QUEUE, idle_timeout=5.0)
            state.set("twopc_marker_queue_depth", sum(not m.is_sentinel for m in markers))
            credits = [
                m for m in client.browse(CREDIT_QUEUE, idle_timeout=5.0) if not m.is_sentinel
            ]
            state.set("twopc_consumer_queue_depth", len(credits))
            stamps = [
                int(m.headers["timestamp"])
                for m in credits
                if m.headers.get("timestamp", "").isdigit()
            ]
            lag = time.time() - min(stamps) / 1000 if stamps else 0.0
            state.set("twopc_consumer_lag_seconds", max(lag, 0.0))
            dead = client.browse(dead_letter_queue(CREDIT_QUEUE), idle_timeout=5.0)
            state.set("twopc_dead_letters", sum(not m.is_sentinel for m in dead))


class StatsCollector(Collector):
    """A relay's or consumer's own counts (its ``stats`` dataclass), read at each scrape."""

    def __init__(
        self, name: str, help_text: str, label: str, worker: Any, outcomes: tuple[str, ...]
    ) -> None:
        self.name, self.help_text, self.label, self.worker = name, help_text, label, worker
        self.outcomes = outcomes

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.help_text, labels=[self.label, "outcome"])
        counts = self.worker.stats.as_dict()
        for outcome in (o for o in self.outcomes if o in counts):
            count = counts[outcome]
            family.add_metric([str(getattr(self.worker, "name", self.label)), outcome], count)
        yield family


@dataclass
class MetricsServer:
    """The registry and the HTTP server of one process."""

    registry: CollectorRegistry
    transactions: TransactionMetrics
    port: int
    _stop: Callable[[], None]
    address: str = "127.0.0.1"  # where it listens (TWOPC_METRICS_ADDRESS)

    def watch_relay(self, relay: Any) -> None:
        self.registry.register(
            StatsCollector(
                "twopc_relay_messages",
                "Messages this relay handled, by outcome.",
                "relay",
                relay,
                ("sent", "failed", "ignored", "replays_skipped"),
            )
        )

    def watch_consumer(self, consumer: Any) -> None:
        self.registry.register(
            StatsCollector(
                "twopc_consumer_messages",
                "Messages this consumer handled, by outcome.",
                "consumer",
                consumer,
                ("applied", "duplicates", "rejected", "dead_lettered", "in_doubt"),
            )
        )

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            wiring.COORDINATOR_OBSERVERS.remove(self.transactions.observe)
        self._stop()


def serve(settings: Settings, port: int, *, address: str | None = None) -> MetricsServer:
    """Serve /metrics on ``port`` (0: a free one) and count every coordinator opened here.

    It listens on ``address``, by default the settings' ``TWOPC_METRICS_ADDRESS``
    (127.0.0.1 unless set: only this host can scrape it).
    """
    address = settings.metrics_address if address is None else address
    registry = CollectorRegistry()
    transactions = TransactionMetrics(registry)
    registry.register(ServerCollector(settings))
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {address} port {port} ({METRICS_ADDRESS}, "
            f"{METRICS_PORT}): {exc.strerror or exc}; set {METRICS_PORT} to a free port"
        ) from exc

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    wiring.COORDINATOR_OBSERVERS.append(transactions.observe)
    return MetricsServer(
        registry, transactions, int(server.server_port), stop, address=str(server.server_address[0])
    )
