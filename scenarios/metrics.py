"""The demo's Prometheus metrics and the /metrics server of the long-running commands.

The transaction-level figures (outcomes, phase times, forced writes, prepared
branches, headroom, in doubt, the marker queue) are the library's
:class:`coordinator.metrics.TransactionMetrics`; this module adds only what the
transfer demo's workers leave behind, read from the servers at each scrape: the
status relay's backlog and lag, the CDC slot's lag, the credit queue's depth and
its oldest message's age (the consumer's lag), the dead letters, and what a relay
or consumer running here did.

:func:`serve` hooks every coordinator :mod:`scenarios.wiring` opens in this
process. Long-running commands serve it when ``TWOPC_METRICS_PORT`` is set, on
``TWOPC_METRICS_ADDRESS`` (default 127.0.0.1: this host only; 0.0.0.0 for every
interface).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator import metrics as library
from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from coordinator.metrics import Readings, TransactionMetrics, gauge_families
from participants.activemq import marker_queue_for
from participants.marker_queue import read_markers
from participants.postgres import PostgresResource
from scenarios import wiring
from scenarios.config import Settings
from scenarios.config_values import METRICS_ADDRESS, METRICS_PORT
from scenarios.transfer.destinations import dead_letter_queue
from scenarios.transfer.model import CREDIT_QUEUE
from scenarios.transfer.schema import CDC_SLOT

#: Every metric name a served /metrics exports: the library's and the demo's
#: (docs/alerts.yml is checked against it).
METRIC_NAMES = (
    *library.METRIC_NAMES,
    "twopc_relay_pending_messages",
    "twopc_relay_lag_seconds",
    "twopc_cdc_slot_lag_bytes",
    "twopc_consumer_queue_depth",
    "twopc_consumer_lag_seconds",
    "twopc_dead_letters",
    "twopc_relay_messages_total",
    "twopc_consumer_messages_total",
    "twopc_demo_source_up",
)

_HELP = {
    "twopc_relay_pending_messages": "Outbox rows on A the status relay has not sent yet.",
    "twopc_relay_lag_seconds": "Age of the oldest outbox row not sent yet; 0 when none.",
    "twopc_cdc_slot_lag_bytes": "WAL bytes of A the CDC relay's slot has not confirmed.",
    "twopc_consumer_queue_depth": "Credit commands waiting on the consumer's queue.",
    "twopc_consumer_lag_seconds": "Age of the oldest credit command on the consumer's "
    "queue (its broker timestamp); 0 when none.",
    "twopc_dead_letters": "Messages on the dead-letter queue of the credit queue.",
}


class MarkerQueue:
    """The coordinator's marker queue on the lab broker, browsed over a short-lived STOMP
    connection (for a process that opens no coordinator: the library reads its markers)."""

    name = "broker"

    def __init__(self, settings: Settings, queue: str | None = None) -> None:
        self.settings = settings
        self.queue = queue or marker_queue_for(settings.coordinator_id)

    def markers(self) -> set[str]:
        with wiring.open_stomp(self.settings, participant="metrics") as client:
            return read_markers(client, self.queue, 5.0)


class DemoCollector(Collector):
    """The transfer demo's lags, read from A and the broker at each scrape; a source it
    cannot reach shows as ``twopc_demo_source_up{source=...} 0``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        readings = self.read()
        up = GaugeMetricFamily(
            "twopc_demo_source_up",
            "1 if the last scrape could read the demo's figures from the source.",
            labels=["source"],
        )
        for source, ok in readings.up.items():
            up.add_metric([source], 1.0 if ok else 0.0)
        yield up
        yield from gauge_families(readings, _HELP)

    def read(self) -> Readings:
        readings = Readings()
        try:
            with psycopg.connect(self.settings.pg_a, autocommit=True, connect_timeout=3) as conn:
                self._read_relay(readings, conn)
            readings.up["database a"] = True
        except psycopg.Error:
            readings.up["database a"] = False
        try:
            self._read_broker(readings)
            readings.up["broker"] = True
        except TwoPhaseCommitError:
            readings.up["broker"] = False
        return readings

    @staticmethod
    def _read_relay(readings: Readings, conn: psycopg.Connection[Any]) -> None:
        """The status relay's backlog and the CDC slot's lag, where the tables exist."""
        if conn.execute("SELECT to_regclass('outbox') IS NOT NULL").fetchone() == (True,):
            row = conn.execute(
                "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() -"
                " min(created_at)), 0)::float8 FROM outbox WHERE status = 'pending'"
            ).fetchone()
            assert row is not None
            readings.set("twopc_relay_pending_messages", row[0])
            readings.set("twopc_relay_lag_seconds", row[1])
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (CDC_SLOT,),
        ).fetchone()
        if row is not None and row[0] is not None:
            readings.set("twopc_cdc_slot_lag_bytes", row[0])

    def _read_broker(self, readings: Readings) -> None:
        with wiring.open_stomp(self.settings, participant="metrics") as client:
            credits = [
                m for m in client.browse(CREDIT_QUEUE, idle_timeout=5.0) if not m.is_sentinel
            ]
            readings.set("twopc_consumer_queue_depth", len(credits))
            stamps = [
                int(m.headers["timestamp"])
                for m in credits
                if m.headers.get("timestamp", "").isdigit()
            ]
            lag = time.time() - min(stamps) / 1000 if stamps else 0.0
            readings.set("twopc_consumer_lag_seconds", max(lag, 0.0))
            dead = client.browse(dead_letter_queue(CREDIT_QUEUE), idle_timeout=5.0)
            readings.set("twopc_dead_letters", sum(not m.is_sentinel for m in dead))


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
    _close_too: tuple[PostgresResource, ...] = ()

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
        for resource in self._close_too:
            resource.close()


def serve(settings: Settings, port: int, *, address: str | None = None) -> MetricsServer:
    """Serve /metrics on ``port`` (0: a free one) and count every coordinator opened here.

    The library's collector reads databases A and B and the marker queue even
    when no coordinator runs here; the demo's collector adds its lags. It listens
    on ``address``, by default the settings' ``TWOPC_METRICS_ADDRESS`` (127.0.0.1
    unless set: only this host can scrape it).
    """
    address = settings.metrics_address if address is None else address
    registry = CollectorRegistry()
    transactions = TransactionMetrics(registry)
    databases = tuple(
        PostgresResource(name, dsn, pool_size=0, connect_timeout=3.0)
        for name, dsn in (("a", settings.pg_a), ("b", settings.pg_b))
    )
    transactions.watch(databases, MarkerQueue(settings))
    registry.register(DemoCollector(settings))
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        for resource in databases:
            resource.close()
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
        registry,
        transactions,
        int(server.server_port),
        stop,
        address=str(server.server_address[0]),
        _close_too=databases,
    )
