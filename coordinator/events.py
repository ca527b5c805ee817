"""The names of the structlog events the coordinator emits; no logging set-up here.

Every protocol step emits one of these, with the gtrid bound through
``structlog.contextvars`` (the driver binds it for the whole commit sequence
and copies the context into its phase threads). Per-step events are DEBUG, and
cost no call when DEBUG is filtered (:func:`enabled`, asked once per transaction);
recovery's findings and decisions INFO; failures WARNING, under a name that
says they failed. Participants add their own names (``participants.events``).

twopc never configures logging: the application (or twopc's own CLI) does.
Until structlog is configured, twopc's events go to stderr from WARNING up,
through a logger of twopc's own, rather than structlog's default of every
level to stdout; the global configuration is left untouched either way.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import structlog

# The commit sequence, in protocol order.
BEGIN = "tpc.begin"
WORK_ENDED = "tpc.work.ended"  # Transaction.end_work: prepared now, or at phase 1
PREPARE_STARTED = "tpc.prepare.started"
PREPARE_VOTED = "tpc.prepare.voted"
ONE_PHASE = "tpc.one_phase.commit"
COMMIT_POINT_STARTED = "tpc.commit_point.started"
COMMIT_POINT_REACHED = "tpc.commit_point.reached"
COMMIT_POINT_REFUSED = "tpc.commit_point.refused"
COMMIT_POINT_UNKNOWN = "tpc.commit_point.unknown"
COMMIT_POINT_HEURISTIC = "tpc.commit_point.heuristic"
DECISION_LOGGED = "tpc.decision.logged"
PHASE2_COMMITTED = "tpc.phase2.committed"
PHASE2_RETRY = "tpc.phase2.retry"
PHASE2_DEFERRED = "tpc.phase2.deferred"
END = "tpc.end"
ABORT = "tpc.abort"
HEURISTIC = "tpc.abort.heuristic"  # rolled back, but some branch's work had committed alone
TIMEOUT = "tpc.timeout"

# Recovery: the start-up scan, 'twopc recover', 'twopc indoubt' and the background.
RECOVERY_STARTED = "tpc.recovery.started"
RECOVERY_FENCED = "tpc.recovery.fenced"
RECOVERY_SESSIONS_ENDED = "tpc.recovery.sessions_ended"
RECOVERY_FOUND = "tpc.recovery.found"
RECOVERY_RESOLVED = "tpc.recovery.resolved"
RECOVERY_RESOLVE_FAILED = "tpc.recovery.resolve_failed"
RECOVERY_FINISHED = "tpc.recovery.finished"

# Many coordinators (docs/design.md §4): liveness, and the recovery of dead peers.
LIVENESS_LOST = "tpc.liveness.lost"
PEER_DEAD = "tpc.peers.dead"
PEER_RECOVERED = "tpc.peers.recovered"
PEER_RECOVERY_FAILED = "tpc.peers.recovery_failed"

# The decision log.
LOG_TORN_HEADER_REINITIALISED = "tpc.log.torn_header_reinitialised"
LOG_COMPACTION_FAILED = "tpc.log.compaction_failed"
# A transaction's record could not be written (its outcome says what that meant), or
# close() could not flush the log.
LOG_WRITE_FAILED = "tpc.log.write_failed"

# Housekeeping of the broker's commit markers, and the watchdog's chores.
MARKERS_REMOVED = "tpc.markers.removed"
MARKERS_REMOVE_FAILED = "tpc.markers.remove_failed"
DECISION_ROWS_REMOVED = "tpc.decision_rows.removed"
DECISION_ROWS_REMOVE_FAILED = "tpc.decision_rows.remove_failed"
HOUSEKEEPING_FAILED = "tpc.housekeeping.failed"
# Closing a coordinator (or one that failed to start): a step that failed; the rest ran.
RELEASE_FAILED = "tpc.release.failed"

# An observer (metrics, tracing) of finished transactions raised; the transaction is unaffected.
LISTENER_FAILED = "tpc.listener.failed"


def enabled(logger: Any, level: int = logging.DEBUG) -> bool:
    """Whether ``logger`` (from :func:`get_logger`) passes events of ``level``.

    Asked once per transaction or broker session, when its logger is bound, so that
    an event whose level is filtered costs no call on the commit path: the step
    tests the answer (``if tx.debug: tx.log.debug(...)``). A logger that cannot
    say (not a filtering bound logger) passes everything.
    """
    is_enabled_for = getattr(logger, "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(level))


def get_logger(**bound: Any) -> Any:
    """twopc's structlog logger with ``bound`` values, as the application configured structlog.

    Call it where the event is emitted (or when the emitting object is made),
    not at import: the application configures structlog after its imports.
    A transaction asks for one when it begins: the logger structlog builds is
    kept while the configuration stays the same object for object (a new
    ``structlog.configure``, or ``capture_logs``, builds the next one), so that
    each call costs a ``bind``, not the building of a logger.
    """
    global _BUILT
    if not structlog.is_configured():
        return _UNCONFIGURED.bind(**bound)
    config = tuple(structlog.get_config().values())
    built = _BUILT
    if built is None or not all(a is b for a, b in zip(built[0], config, strict=True)):
        built = _BUILT = (config, structlog.get_logger("twopc").bind())
    return built[1].bind(**bound) if bound else built[1]


def log_contained(event: str, *, level: str = "error", logger: Any = None, **fields: Any) -> None:
    """Emit ``event`` from work that must go on whatever logging does: never raises.

    The watchdog, the peer check and the backlog's chores log their failures and
    timeouts through this (docs/design.md §2, the watchdog). A log call
    there that raised (an application's processor with a bug, a stream that went
    away) would end the loop, and with it the timeouts of the transactions still
    running and the recovery of their branches. What cannot be logged is written
    to stderr in one line, or dropped if stderr is gone too.
    """
    try:
        getattr(logger if logger is not None else get_logger(), level)(event, **fields)
    except Exception as exc:
        shown = {k: v for k, v in fields.items() if k != "exc_info"}
        with contextlib.suppress(Exception):
            print(
                f"twopc: {event} {shown} could not be logged: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )


class StderrLogger(structlog.PrintLogger):
    """structlog's PrintLogger, except that a line which cannot be written is dropped.

    stderr can go away under a running process (``twopc transfer 2>&1 | head``: the
    reader exits, every later write raises BrokenPipeError). A log call must not raise
    then: in the coordinator's watchdog or peer check it would end the thread, and
    transactions would wait on their locks with nothing left to time them out.
    """

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a broken pipe, a closed file
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


#: The configuration twopc's logger was last built from, and that logger (get_logger).
_BUILT: tuple[tuple[object, ...], Any] | None = None


# Built here, once (bind() turns structlog's lazy proxy into the logger), so that a
# transaction's logger is one bind of it.
_UNCONFIGURED = structlog.wrap_logger(
    StderrLogger(sys.stderr),
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.dev.ConsoleRenderer(colors=False),
    ],
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
).bind()
