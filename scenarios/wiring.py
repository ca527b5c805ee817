"""Builds a coordinator from settings: the two PostgreSQL databases, ActiveMQ and the log."""

from __future__ import annotations

from typing import Any

from coordinator import failpoints
from coordinator.coordinator import Coordinator
from coordinator.log.file import FileDecisionLog
from participants.activemq import ActiveMQ
from participants.postgres import PostgresResource
from scenarios.config import Settings


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
    resources = [
        PostgresResource("a", settings.pg_a, setting="TWOPC_PG_A", pool_size=sessions + 8),
        PostgresResource("b", settings.pg_b, setting="TWOPC_PG_B", pool_size=sessions + 8),
    ]
    broker = ActiveMQ(settings.stomp, settings.coordinator_id, pool_size=sessions)
    try:
        return Coordinator(
            settings.coordinator_id,
            log,
            resources,
            broker,
            recover_on_start=recover,
            max_workers=max(sessions, 4),
            **options,
        )
    except BaseException:
        for resource in resources:
            resource.close()
        broker.close()
        log.close()
        raise
