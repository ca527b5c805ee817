"""Builds from settings: the participants (PostgreSQL A and B, ActiveMQ), the coordinator, recovery.

This is the one place that turns :class:`~scenarios.config.Settings` into
participants: the coordinator, ``twopc indoubt``, the invariant checker and
the overhead benchmark all take theirs from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator import failpoints
from coordinator.coordinator import Coordinator
from coordinator.log.file import FileDecisionLog, read_pending
from coordinator.recovery import InDoubt, Recovery, RecoveryReport
from participants.activemq import ActiveMQ
from participants.aio.activemq import AsyncActiveMQ
from participants.aio.postgres import AsyncPostgresResource
from participants.postgres import PostgresResource
from participants.stomp_client import StompClient
from scenarios.config import Settings


def databases(settings: Settings, *, pool_size: int) -> list[PostgresResource]:
    """Databases A and B as the resources 'a' and 'b'; each keeps ``pool_size`` idle sessions."""
    return [
        PostgresResource("a", settings.pg_a, setting="TWOPC_PG_A", pool_size=pool_size),
        PostgresResource("b", settings.pg_b, setting="TWOPC_PG_B", pool_size=pool_size),
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
    """Databases 'a' and 'b' and the broker 'mq' as asyncio participants (coordinator.aio)."""
    resources = [
        AsyncPostgresResource("a", settings.pg_a, setting="TWOPC_PG_A", pool_size=pool_size),
        AsyncPostgresResource("b", settings.pg_b, setting="TWOPC_PG_B", pool_size=pool_size),
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


def open_coordinator(
    settings: Settings | None = None,
    *,
    recover: bool = True,
    sessions: int = 32,
    **options: Any,
) -> Coordinator:
    """A coordinator over databases 'a' and 'b' and the broker 'mq', recovered and ready.

    ``sessions`` is the number of broker sessions (and of concurrent
    transactions with a broker branch); ``options`` go to Coordinator.
    Failpoints named in TWOPC_FAILPOINTS are armed here (in a test process only).
    """
    settings = settings or Settings.load()
    failpoints.arm_from_env()
    log = FileDecisionLog(settings.log_path)
    resources = databases(settings, pool_size=sessions + 8)
    mq = broker(settings, pool_size=sessions)
    try:
        return Coordinator(
            settings.coordinator_id,
            log,
            resources,
            mq,
            recover_on_start=recover,
            max_workers=max(sessions, 4),
            **options,
        )
    except BaseException:
        for resource in resources:
            resource.close()
        mq.close()
        log.close()
        raise


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
    b = PostgresResource("b", settings.pg_b, setting="TWOPC_PG_B", pool_size=2)
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
    return coordinator, mq


def in_doubt(settings: Settings) -> list[InDoubt]:
    """What is in doubt and what recovery would do, read without fencing; changes nothing."""
    resources = databases(settings, pool_size=1)
    mq = broker(settings, pool_size=1)
    try:
        pending = read_pending(settings.log_path)
        report = Recovery(settings.coordinator_id, None, resources, mq, pending=pending).run(
            dry_run=True
        )
    finally:
        for resource in resources:
            resource.close()
        mq.close()
    return report.items


def recover(
    settings: Settings | None = None, *, fence_timeout: float = 30.0, sessions: int = 32
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
