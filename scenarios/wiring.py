"""Builds from settings: the participants (PostgreSQL A and B, ActiveMQ), the coordinator, recovery.

This is the one place that turns :class:`~scenarios.config.Settings` into
participants: the coordinator, ``twopc indoubt``, the invariant checker and
the overhead benchmark all take theirs from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from coordinator import failpoints
from coordinator.aio.coordinator import AsyncCoordinator
from coordinator.coordinator import Coordinator
from coordinator.errors import ConfigurationError
from coordinator.log import DecisionLog
from coordinator.log.file import FileDecisionLog, read_pending
from coordinator.log.table import TableDecisionLog
from coordinator.peers import PeerRecovery, owner
from coordinator.recovery import InDoubt, Recovery, RecoveryReport
from participants.activemq import ActiveMQ
from participants.aio.activemq import AsyncActiveMQ
from participants.aio.postgres import AsyncPostgresResource
from participants.decision_table import PostgresDecisionTable
from participants.membership import PostgresMembership
from participants.postgres import PostgresResource
from participants.stomp_client import StompClient
from scenarios.config import Settings


def databases(settings: Settings, *, pool_size: int) -> list[PostgresResource]:
    """Databases A and B as the resources 'a' and 'b'; each keeps ``pool_size`` idle sessions.

    Every session they open carries the coordinator id as its ``application_name``.
    """
    return [
        PostgresResource(
            name,
            dsn,
            setting=f"TWOPC_PG_{name.upper()}",
            pool_size=pool_size,
            application_name=settings.coordinator_id,
        )
        for name, dsn in (("a", settings.pg_a), ("b", settings.pg_b))
    ]


def broker(settings: Settings, *, pool_size: int, coordinator_id: str | None = None) -> ActiveMQ:
    """The broker as the last resource 'mq', with ``pool_size`` STOMP sessions (client-ids of
    ``coordinator_id``, by default the settings')."""
    return ActiveMQ(
        settings.stomp,
        coordinator_id or settings.coordinator_id,
        pool_size=pool_size,
        **settings.stomp_options(),
    )


def async_participants(
    settings: Settings, coordinator_id: str, *, pool_size: int
) -> tuple[list[AsyncPostgresResource], AsyncActiveMQ]:
    """Databases 'a' and 'b' and the broker 'mq' as asyncio participants (coordinator.aio);
    every database session carries ``coordinator_id`` as its ``application_name``, as
    :func:`databases` does (fencing ends a coordinator's sessions by it)."""
    resources = [
        AsyncPostgresResource(
            name,
            dsn,
            setting=f"TWOPC_PG_{name.upper()}",
            pool_size=pool_size,
            application_name=coordinator_id,
        )
        for name, dsn in (("a", settings.pg_a), ("b", settings.pg_b))
    ]
    mq = AsyncActiveMQ(
        settings.stomp, coordinator_id, pool_size=pool_size, **settings.stomp_options()
    )
    return resources, mq


def open_stomp(
    settings: Settings,
    *,
    participant: str = "mq",
    client_id: str | None = None,
    address: str | None = None,
    connect_timeout: float = 5.0,
) -> StompClient:
    """A STOMP connection to the broker (or to ``address``, e.g. a proxy in front of it),
    logged in and over TLS as the settings say."""
    return StompClient.open(
        address or settings.stomp,
        participant=participant,
        client_id=client_id,
        connect_timeout=connect_timeout,
        **settings.stomp_options(),
    )


#: Called with every coordinator opened here, on threads or asyncio (scenarios.metrics
#: counts its transactions).
COORDINATOR_OBSERVERS: list[Callable[[Coordinator | AsyncCoordinator], None]] = []

AnyCoordinator = TypeVar("AnyCoordinator", Coordinator, AsyncCoordinator)


def _observed(coordinator: AnyCoordinator) -> AnyCoordinator:
    for observe in COORDINATOR_OBSERVERS:
        observe(coordinator)
    return coordinator


def peer_broker(settings: Settings, peer: str) -> ActiveMQ:
    """The broker as dead peer ``peer`` saw it (its client-ids): to fence it and read its
    markers."""
    return broker(replace(settings, coordinator_id=peer), pool_size=1)


#: The broker sessions of a coordinator, so the most transactions it runs at once.
DEFAULT_SESSIONS = 32


def open_coordinator(
    settings: Settings | None = None,
    *,
    recover: bool = True,
    sessions: int = DEFAULT_SESSIONS,
    **options: Any,
) -> Coordinator:
    """A coordinator over databases 'a' and 'b' and the broker 'mq', recovered and ready.

    ``sessions`` is the number of broker sessions (and of concurrent
    transactions with a broker branch); ``options`` go to Coordinator.
    Failpoints named in TWOPC_FAILPOINTS are armed here (in a test process only).
    """
    settings = settings or Settings.load()
    failpoints.arm_from_env()
    resources = databases(settings, pool_size=sessions + 8)
    mq = broker(settings, pool_size=sessions)
    log: DecisionLog | None = None
    try:
        log, holder, membership = decision_log(settings, resources)
        return _observed(
            Coordinator(
                settings.coordinator_id,
                log,
                resources,
                mq,
                **_coordinator_options(settings, recover, sessions, holder, membership, options),
            )
        )
    except BaseException:
        for resource in resources:
            resource.close()
        mq.close()
        if log is not None:
            log.close()
        raise


def _coordinator_options(
    settings: Settings,
    recover: bool,
    sessions: int,
    holder: PostgresDecisionTable | None,
    membership: PostgresMembership | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The keywords both coordinators of the settings take, beside their participants."""
    return {
        "recover_on_start": recover,
        "max_workers": max(sessions, 4),
        "membership": membership,
        "decision_holder": holder,
        "peer_broker": partial(peer_broker, settings),
        **options,
    }


def open_async_coordinator(
    settings: Settings | None = None,
    *,
    recover: bool = True,
    sessions: int = DEFAULT_SESSIONS,
    **options: Any,
) -> AsyncCoordinator:
    """:func:`open_coordinator` for asyncio: databases 'a' and 'b' and the broker 'mq' as
    asyncio participants, the decisions where TWOPC_DECISIONS says; start it with
    ``await coordinator.start()`` (recovery runs then, unless ``recover`` is False).

    With TWOPC_DECISIONS=postgres the decision table, the membership and the brokers of
    dead peers are the synchronous ones (the coordinator runs them on its threads). They
    take sessions of their own only while they work (the table and the liveness lock
    one each, closed by the coordinator's close), over databases of their own that keep
    no idle session.
    """
    settings = settings or Settings.load()
    failpoints.arm_from_env()
    # First: a log file locked by another process, or a database that cannot keep the
    # decisions, stops here.
    log, holder, membership = decision_log(settings, databases(settings, pool_size=0))
    try:
        resources, mq = async_participants(settings, settings.coordinator_id, pool_size=sessions)
        return _observed(
            AsyncCoordinator(
                settings.coordinator_id,
                log,
                resources,
                mq,
                **_coordinator_options(settings, recover, sessions, holder, membership, options),
            )
        )
    except BaseException:
        log.close()
        raise


def decision_log(
    settings: Settings, resources: list[PostgresResource], *, log_path: Path | None = None
) -> tuple[DecisionLog, PostgresDecisionTable | None, PostgresMembership | None]:
    """The decision log TWOPC_DECISIONS names, and in postgres mode the decision holder
    (the coordinator's role, not the log's) and the membership.

    ``file``: ``$TWOPC_HOME/decisions.log``. ``postgres``: no local state (docs/design.md §4):
    decision rows in the commit-markable database (TWOPC_DECISION_PARTICIPANT),
    where the liveness locks are too; fencing covers every database. ``log_path``
    overrides the file's place (a coordinator beside the main one, e.g. a benchmark's).
    """
    if settings.decisions == "file":
        return FileDecisionLog(log_path or settings.log_path), None, None
    home = next(r for r in resources if r.name == settings.decision_participant)
    table = PostgresDecisionTable(home)
    table.create()
    membership = PostgresMembership(settings.coordinator_id, home, resources)
    return TableDecisionLog(table), table, membership


#: What the consuming coordinator's id adds to the settings' coordinator id.
CONSUMER_ID_SUFFIX = "-consumer"


def consumer_coordinator_id(settings: Settings) -> str:
    """The id of the coordinator ``twopc consumer --mode 2pc`` runs: its own gtrid prefix,
    client-id and decision log, so that its recovery and the writers' never meet."""
    return settings.coordinator_id[: 24 - len(CONSUMER_ID_SUFFIX)] + CONSUMER_ID_SUFFIX


def consumer_log_path(settings: Settings) -> Path:
    """The decision log of the consuming coordinator."""
    return settings.home / "consumer-decisions.log"


def open_consuming_coordinator(
    settings: Settings, *, recover: bool = True, **options: Any
) -> tuple[Coordinator, ActiveMQ]:
    """A coordinator over database 'b' and the broker, with one broker session to
    subscribe and acknowledge on (ActiveMQ.subscribe), recovered and ready."""
    failpoints.arm_from_env()
    coordinator_id = consumer_coordinator_id(settings)
    log = FileDecisionLog(consumer_log_path(settings))
    b = PostgresResource(
        "b", settings.pg_b, setting="TWOPC_PG_B", pool_size=2, application_name=coordinator_id
    )
    mq = ActiveMQ(settings.stomp, coordinator_id, pool_size=1, **settings.stomp_options())
    try:
        coordinator = Coordinator(
            coordinator_id, log, [b], mq, recover_on_start=recover, max_workers=4, **options
        )
    except BaseException:
        b.close()
        mq.close()
        log.close()
        raise
    return _observed(coordinator), mq


def open_consuming_async_coordinator(
    settings: Settings, *, recover: bool = True
) -> tuple[AsyncCoordinator, AsyncActiveMQ]:
    """:func:`open_consuming_coordinator` for asyncio: the same coordinator id, decision log,
    database 'b' and one broker session (AsyncActiveMQ.subscribe); start it with
    ``await coordinator.start()`` (recovery runs then)."""
    failpoints.arm_from_env()
    coordinator_id = consumer_coordinator_id(settings)
    log = FileDecisionLog(consumer_log_path(settings))
    b = AsyncPostgresResource(
        "b", settings.pg_b, setting="TWOPC_PG_B", pool_size=2, application_name=coordinator_id
    )
    mq = AsyncActiveMQ(settings.stomp, coordinator_id, pool_size=1, **settings.stomp_options())
    coordinator = AsyncCoordinator(coordinator_id, log, [b], mq, recover_on_start=recover)
    return coordinator, mq


def in_doubt(settings: Settings) -> list[InDoubt]:
    """What is in doubt and what recovery would do, read without fencing; changes nothing."""
    resources = databases(settings, pool_size=1)
    mq = broker(settings, pool_size=1)
    table = None
    try:
        if settings.decisions == "postgres":  # no local log: the rows and markers tell
            pending: dict[str, tuple[str, ...]] = {}
            table = PostgresDecisionTable(
                next(r for r in resources if r.name == settings.decision_participant)
            )
        else:
            pending = read_pending(settings.log_path)
        report = Recovery(
            settings.coordinator_id, None, resources, mq, pending=pending, decision_holder=table
        ).run(dry_run=True)
    finally:
        if table is not None:
            table.close()
        for resource in resources:
            resource.close()
        mq.close()
    return report.items


def recover(
    settings: Settings | None = None,
    *,
    fence_timeout: float = 30.0,
    sessions: int = DEFAULT_SESSIONS,
) -> RecoveryReport:
    """Resolve every in-doubt transaction of this coordinator and report what was done.

    The coordinator is opened without its start-up recovery, so that the
    report covers everything found, and closed again.
    """
    coordinator = open_coordinator(settings, recover=False, sessions=sessions)
    try:
        return coordinator.recover(fence_timeout=fence_timeout)
    finally:
        coordinator.close()


def recover_dead(
    settings: Settings | None = None, *, fence_timeout: float = 30.0
) -> list[PeerRecovery]:
    """``twopc recover --dead``: fence and recover every dead peer, from any machine.

    Runs as a coordinator of its own (TWOPC_COORDINATOR_ID must not be a live
    instance's), with TWOPC_DECISIONS=postgres. Besides prepared branches, the
    registered peers that left markers (on their own marker queues) and the owners
    of decision rows count: their leftovers are swept.
    """
    settings = settings or Settings.load()
    if settings.decisions != "postgres":
        raise ConfigurationError(
            "'twopc recover --dead' needs TWOPC_DECISIONS=postgres: with a file log the "
            "decisions of another coordinator are in its own file"
        )
    coordinator = open_coordinator(settings, recover=False, sessions=1, peer_interval=None)
    try:
        owning: set[str] = set()
        if coordinator.broker is not None and coordinator.membership is not None:
            # Each peer's markers are on its own queue (its shared-queue ones read too).
            for peer in coordinator.membership.peers():
                if peer != settings.coordinator_id and _has_markers(settings, peer):
                    owning.add(peer)
        if coordinator.decision_holder is not None:
            owning |= {owner(g) for g in coordinator.decision_holder.decided("")}
        return coordinator.recover_dead_peers(also_owning=owning, fence_timeout=fence_timeout)
    finally:
        coordinator.close()


def _has_markers(settings: Settings, coordinator_id: str) -> bool:
    """Whether ``coordinator_id`` left commit markers (read without fencing)."""
    mq = broker(settings, pool_size=1, coordinator_id=coordinator_id)
    try:
        return bool(mq.markers())
    finally:
        mq.close()
