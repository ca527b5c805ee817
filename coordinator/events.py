"""structlog set-up and the names of the events every protocol step emits."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

# Event names, in protocol order. Each is emitted with the gtrid bound.
BEGIN = "tpc.begin"
WORK_FAILED = "tpc.work.failed"
PREPARE_STARTED = "tpc.prepare.started"
PREPARE_VOTED = "tpc.prepare.voted"
ONE_PHASE = "tpc.one_phase.commit"
COMMIT_POINT_STARTED = "tpc.commit_point.started"
COMMIT_POINT_REACHED = "tpc.commit_point.reached"
COMMIT_POINT_REFUSED = "tpc.commit_point.refused"
COMMIT_POINT_UNKNOWN = "tpc.commit_point.unknown"
DECISION_LOGGED = "tpc.decision.logged"
PHASE2_COMMITTED = "tpc.phase2.committed"
PHASE2_RETRY = "tpc.phase2.retry"
PHASE2_DEFERRED = "tpc.phase2.deferred"
END = "tpc.end"
ABORT = "tpc.abort"
ROLLBACK_FAILED = "tpc.rollback.failed"
TIMEOUT = "tpc.timeout"
RECOVERY_STARTED = "tpc.recovery.started"
RECOVERY_FENCED = "tpc.recovery.fenced"
RECOVERY_FOUND = "tpc.recovery.found"
RECOVERY_RESOLVED = "tpc.recovery.resolved"
RECOVERY_FINISHED = "tpc.recovery.finished"
MARKERS_REMOVED = "tpc.markers.removed"

_configured = False


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Set up structlog once: level from ``TWOPC_LOG_LEVEL`` (default WARNING), to stderr.

    Per-step events are DEBUG so the commit path pays almost nothing for them
    unless asked; outcomes of recovery are INFO; failures WARNING or ERROR.
    """
    global _configured
    level_name = (level or os.environ.get("TWOPC_LOG_LEVEL", "WARNING")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.WARNING
    use_json = json if json is not None else os.environ.get("TWOPC_LOG_FORMAT") == "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # stomp.py warns through stdlib logging when it closes a socket twice, which
    # our deliberate drops of sessions in an unknown state do; its errors still show.
    logging.getLogger("stomp.py").setLevel(max(numeric, logging.ERROR))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` values (configure() first if nobody has)."""
    if not _configured:
        configure()
    return structlog.get_logger("twopc").bind(**bound)
