"""Prometheus metrics of the coordinators of this process (the ``metrics`` extra:
prometheus-client, imported only when a :class:`TransactionMetrics` is made).

Two kinds of figures (docs/api.md, "Metrics"):

* counted as things happen, fed by each observed coordinator's listener
  (sync or asyncio): transactions by outcome (``twopc_transactions_total``),
  what the backlog resolved later (``twopc_resolved_total``, each gtrid once),
  the time of each phase (``twopc_phase_seconds``, from ``timings``), and the
  decision log's forced writes;
* read from the participants at each scrape, through their public API, so that
  they show what a dead process left behind too: prepared branches and the
  oldest one's age per database (``recover``), ``max_prepared_transactions`` and
  its headroom (:class:`ReportsCapacity`), transactions in doubt, and the
  marker queue's depth (the last resource's ``markers``).

Nothing here knows a scenario: a program registers the collector in its own
registry and serves it as it likes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from coordinator.backlog import Resolved
from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from coordinator.log import DecisionLog
from coordinator.protocol import LastResource, XAResource
from coordinator.states import Outcome
from coordinator.xid import FORMAT_ID

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

#: A branch prepared for longer than this counts as in doubt: a live transaction
#: goes from PREPARE to COMMIT PREPARED in milliseconds, far below the default
#: transaction timeout (30 s) that this matches.
IN_DOUBT_AFTER = 30.0

#: The phases of ``timings``: upper bounds of their histogram buckets (s).
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

#: Every metric name :class:`TransactionMetrics` exports.
METRIC_NAMES = (
    "twopc_transactions_total",
    "twopc_resolved_total",
    "twopc_phase_seconds",
    "twopc_decision_log_forced_writes_total",
    "twopc_in_doubt_transactions",
    "twopc_prepared_branches",
    "twopc_oldest_prepared_age_seconds",
    "twopc_max_prepared_transactions",
    "twopc_prepared_headroom",
    "twopc_marker_queue_depth",
    "twopc_source_up",
)


@dataclass(frozen=True)
class PreparedCapacity:
    """How many prepared transactions a database server allows and holds, and its clock
    (prepared ages are measured against it, not against this host's)."""

    max_prepared: int  # max_prepared_transactions
    prepared: int  # prepared transactions on the server, of any format and database
    now: datetime


@runtime_checkable
class ReportsCapacity(Protocol):
    """An XA participant whose server limits prepared transactions
    (:class:`~participants.postgres.PostgresResource`)."""

    def prepared_capacity(self) -> PreparedCapacity: ...


class HoldsMarkers(Protocol):
    """Where the commit markers are: a :class:`~coordinator.protocol.LastResource`, or
    anything that can list them."""

    @property
    def name(self) -> str: ...

    def markers(self) -> set[str]: ...


class Observed(Protocol):
    """What the collector reads of a coordinator: Coordinator and AsyncCoordinator both."""

    coordinator_id: str
    log: DecisionLog

    def add_listener(self, listener: Callable[[Any, Outcome], None]) -> None: ...

    @property
    def recovery_resources(self) -> Mapping[str, XAResource]: ...

    @property
    def recovery_broker(self) -> LastResource | None: ...

    @property
    def closed(self) -> bool: ...


@dataclass
class Readings:
    """What one scrape read from the participants (for the collector, and for tests)."""

    up: dict[str, bool] = field(default_factory=dict)
    gauges: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges.setdefault(name, []).append((labels, float(value)))


_HELP = {
    "twopc_in_doubt_transactions": "Global transactions with a branch prepared for longer "
    "than the in-doubt age (left for recovery: 'twopc indoubt', 'twopc recover').",
    "twopc_prepared_branches": "Prepared transactions of twopc's format in the database.",
    "twopc_oldest_prepared_age_seconds": "Age of the oldest prepared transaction of "
    "twopc's format in the database (against the server's clock); 0 when none.",
    "twopc_max_prepared_transactions": "The database server's max_prepared_transactions.",
    "twopc_prepared_headroom": "max_prepared_transactions minus the server's prepared "
    "transactions: how many more can prepare.",
    "twopc_marker_queue_depth": "Gtrids with a commit marker on the marker queue.",
}


class TransactionMetrics:
    """The collector: what this process's coordinators did, and what their participants
    hold at each scrape.

    ``observe`` a coordinator (sync or asyncio) to count its transactions and read
    its participants; ``watch`` participants that no coordinator here owns (a
    process that only reports). A participant is read once per scrape, by name.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, in_doubt_after: float = IN_DOUBT_AFTER
    ) -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Histogram
        except ImportError as exc:
            raise ConfigurationError(
                "metrics need prometheus-client: install the 'metrics' extra"
            ) from exc
        registry = REGISTRY if registry is None else registry
        self.in_doubt_after = in_doubt_after
        self.transactions = Counter(
            "twopc_transactions",
            "Global transactions finished by this process, by outcome.",
            ["coordinator", "outcome"],
            registry=registry,
        )
        self.resolved = Counter(
            "twopc_resolved",
            "Transactions the backlog finished or decided after their caller had the "
            "outcome 'was' (in-doubt, or committed with phase 2 unfinished), by outcome.",
            ["coordinator", "was", "outcome"],
            registry=registry,
        )
        self.phases = Histogram(
            "twopc_phase_seconds",
            "Seconds a transaction spent in each phase of the commit sequence.",
            ["coordinator", "phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self._coordinators: list[Observed] = []
        self._resources: list[XAResource] = []
        self._broker: HoldsMarkers | None = None
        self._resolved: set[tuple[str, str]] = set()  # (coordinator, gtrid) counted
        self._lock = threading.Lock()
        registry.register(self)

    # -- what feeds it --------------------------------------------------------------

    def observe(self, coordinator: Observed) -> None:
        """Count ``coordinator``'s transactions and its log's forced writes from now on,
        and read its participants at each scrape while it is open."""
        cid = coordinator.coordinator_id
        for outcome in Outcome:  # every outcome shows, at 0 until it happens
            self.transactions.labels(cid, outcome.value)

        def finished(tx: Any, outcome: Outcome) -> None:
            if isinstance(tx, Resolved):
                self._count_resolved(cid, tx)
                return
            self.transactions.labels(cid, outcome.value).inc()
            for phase, seconds in tx.timings.items():
                self.phases.labels(cid, phase).observe(seconds)

        coordinator.add_listener(finished)
        with self._lock:
            self._coordinators.append(coordinator)

    def forget(self, coordinator: Observed) -> None:
        """Stop reading ``coordinator`` (its counts stay)."""
        with self._lock, contextlib.suppress(ValueError):
            self._coordinators.remove(coordinator)

    def watch(self, resources: Iterable[XAResource], broker: HoldsMarkers | None = None) -> None:
        """Read these participants (and the broker's marker queue) at each scrape too."""
        with self._lock:
            self._resources.extend(resources)
            if broker is not None:
                self._broker = broker

    def _count_resolved(self, cid: str, resolved: Resolved) -> None:
        with self._lock:
            if (cid, resolved.gtrid) in self._resolved:
                return  # told twice (a retry raced a report): one transaction, one count
            self._resolved.add((cid, resolved.gtrid))
        self.resolved.labels(cid, resolved.was.value, resolved.outcome.value).inc()

    # -- what a scrape reads ------------------------------------------------------------

    def _sources(self) -> tuple[list[Observed], dict[str, XAResource], HoldsMarkers | None]:
        with self._lock:
            coordinators = list(self._coordinators)
            resources = {r.name: r for r in reversed(self._resources)}
            broker = self._broker
        for coordinator in coordinators:
            if coordinator.closed:
                continue
            for name, resource in coordinator.recovery_resources.items():
                resources.setdefault(name, resource)
            if broker is None:
                broker = coordinator.recovery_broker
        return coordinators, resources, broker

    def read(self) -> Readings:
        """Read every participant once: prepared branches, their age, the headroom, the
        gtrids in doubt, the marker queue; a participant that fails shows as down."""
        _, resources, broker = self._sources()
        readings = Readings()
        in_doubt: set[str] = set()
        for name, resource in sorted(resources.items()):
            try:
                in_doubt |= self._read_database(readings, name, resource)
                readings.up[f"database {name}"] = True
            except TwoPhaseCommitError:
                readings.up[f"database {name}"] = False
        readings.set("twopc_in_doubt_transactions", len(in_doubt))
        if broker is not None:
            try:
                readings.set("twopc_marker_queue_depth", len(broker.markers()))
                readings.up["broker"] = True
            except TwoPhaseCommitError:
                readings.up["broker"] = False
        return readings

    def _read_database(self, readings: Readings, name: str, resource: XAResource) -> set[str]:
        """One database's figures; the gtrids prepared there longer than the in-doubt age."""
        capacity = resource.prepared_capacity() if isinstance(resource, ReportsCapacity) else None
        now = capacity.now if capacity is not None else datetime.now(UTC)
        prepared = resource.recover(FORMAT_ID, "")
        ages = {
            xid.gtrid: (now - at).total_seconds() for xid, at in prepared.items() if at is not None
        }
        readings.set("twopc_prepared_branches", len(prepared), database=name)
        readings.set("twopc_oldest_prepared_age_seconds", max([0.0, *ages.values()]), database=name)
        if capacity is not None:
            readings.set("twopc_max_prepared_transactions", capacity.max_prepared, database=name)
            readings.set(
                "twopc_prepared_headroom", capacity.max_prepared - capacity.prepared, database=name
            )
        return {gtrid for gtrid, age in ages.items() if age > self.in_doubt_after}

    def collect(self) -> Iterator[Metric]:
        """The scrape: forced writes, then what :meth:`read` finds (prometheus-client's
        collector interface; counters and the histogram are collected on their own)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        coordinators, _, _ = self._sources()
        forced = CounterMetricFamily(
            "twopc_decision_log_forced_writes",
            "fsyncs of the decision log since this process opened it.",
            labels=["coordinator"],
        )
        for coordinator in coordinators:
            with contextlib.suppress(Exception):  # a closed log: its count is gone
                forced.add_metric([coordinator.coordinator_id], coordinator.log.forced_writes)
        yield forced
        readings = self.read()
        up = GaugeMetricFamily(
            "twopc_source_up", "1 if the last scrape could read the source.", labels=["source"]
        )
        for source, ok in readings.up.items():
            up.add_metric([source], 1.0 if ok else 0.0)
        yield up
        yield from gauge_families(readings, _HELP)

    def describe(self) -> Iterator[Metric]:
        """Nothing ahead of a scrape: registering must not read the participants."""
        return iter(())


def gauge_families(readings: Readings, helps: Mapping[str, str]) -> Iterator[Metric]:
    """The gauges of ``readings`` named in ``helps``, as metric families."""
    from prometheus_client.core import GaugeMetricFamily

    for name, help_text in helps.items():
        values = readings.gauges.get(name, [])
        labels = sorted({key for found, _ in values for key in found})
        family = GaugeMetricFamily(name, help_text, labels=labels)
        for found, value in values:
            family.add_metric([found.get(key, "") for key in labels], value)
        yield family
