# Generated from coordinator/aio/driver.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""The commit sequence of one global transaction: prepare -> commit point -> log -> phase 2.

Presumed abort (docs/design.md §2): nothing is logged for an abort; the commit point
is the broker's COMMIT of the transaction carrying the commit marker, or,
without a broker writer, the forced COMMIT record in the decision log -- or,
when the coordinator has a decision holder (docs/design.md §3), that
participant's one-phase commit of its branch carrying the decision row, after
every other branch prepared. The failpoints around the commit point are the
driver's: a participant only calls the callbacks it is handed.

The sequence is written once, for asyncio, in :mod:`coordinator.aio.driver`;
``scripts/unasync.py`` generates the synchronous :mod:`coordinator.driver` from
it (``async``/``await`` dropped, asyncio names mapped to their thread
counterparts), and ``tests/test_unasync.py`` checks that the generated file is
current. What differs between the two is in :mod:`coordinator.compat`, used through
:mod:`coordinator.aio.runtime` (the source of :mod:`coordinator.runtime`).
"""

from __future__ import annotations

import time
from functools import partial

from structlog.contextvars import bound_contextvars

from coordinator import events
from coordinator.compat import sleep
from coordinator.errors import (
    CommitRefused,
    DecisionLogError,
    HeuristicMixed,
    OutcomeUnknown,
    ParticipantError,
    RecordNotDurable,
)
from coordinator.log import commit_record_participants
from coordinator.protocol import LastResourceSession, XABranch
from coordinator.runtime import DriverConfig
from coordinator.states import Outcome, TxEvent
from coordinator.transaction import Transaction

__all__ = ["DriverConfig", "abort", "commit"]


class _Abort(Exception):
    """A step found that the transaction must roll back."""


class _Doubt(Exception):
    """The commit point got no clear answer: the outcome is unknown."""


# -- the sequence ----------------------------------------------------------------------


def commit(tx: Transaction, cfg: DriverConfig) -> Outcome:
    """Commit ``tx``; every exit path leaves it COMPLETED/COMMITTED, ABORTED or IN_DOUBT."""
    with bound_contextvars(gtrid=tx.gtrid):
        try:
            _check_votes_so_far(tx)
            writers, broker, carrier = _commit_read_only(tx, cfg)
            if carrier is None and len(writers) + (broker is not None) <= 1:
                _check_liveness(tx, cfg)
                return _commit_one_phase(tx, cfg, writers, broker)
            _prepare_all(tx, cfg, writers, broker)
            _check_liveness(tx, cfg)
            _reach_commit_point(tx, cfg, writers, broker, carrier)
        except _Abort as refusal:
            return abort(tx, cfg, str(refusal))
        except _Doubt as doubt:
            tx.doubt_because(str(doubt))
            return Outcome.IN_DOUBT
        cfg.failpoint("after_decision")
        if not _phase2(tx, cfg, writers) or tx.log_failure is not None:
            cfg.defer(tx)  # the backlog finishes it: phase 2, the missing COMMIT record, END
            return Outcome.COMMITTED
        _end(tx, cfg)
        return Outcome.COMMITTED


def abort(tx: Transaction, cfg: DriverConfig, reason: str) -> Outcome:
    """Roll back every branch (active or prepared) and the broker; nothing is logged."""
    with bound_contextvars(gtrid=tx.gtrid):
        tx.abandon_because(reason)
        tx.log.info(events.ABORT, reason=reason)
        branches = list(tx.branches.values())
        if branches:
            cfg.run_parallel([b.rollback for b in branches])
        if tx.broker is not None:
            tx.broker.abort()
        tx.handle(TxEvent.ROLLED_BACK)
        return _aborted(tx)


def _aborted(tx: Transaction) -> Outcome:
    """ABORTED, or HEURISTIC_MIXED when a branch's work had committed on its own (its
    failure is HeuristicMixed: a COMMIT inside the branch), which no rollback undoes."""
    committed = tuple(b.name for b in tx.branches.values() if isinstance(b.failure, HeuristicMixed))
    if not committed:
        return Outcome.ABORTED
    tx.heuristic = committed
    names = ", ".join(repr(name) for name in committed)
    tx.reason = (
        f"heuristic outcome: rolled back, but the work of participant {names} had committed "
        f"on its own (a COMMIT inside the branch) and stays committed; {tx.reason}"
    )
    tx.log.warning(events.HEURISTIC, participants=list(committed))
    return Outcome.HEURISTIC_MIXED


# -- the steps ------------------------------------------------------------------------


def _check_votes_so_far(tx: Transaction) -> None:
    """A transaction past its deadline, or whose work failed somewhere, cannot commit."""
    if tx.timed_out or time.monotonic() > tx.deadline:
        raise _Abort("the transaction exceeded its timeout before its commit point")
    failed = [b for b in tx.branches.values() if b.failure is not None]
    for branch in failed:
        if tx.debug:
            tx.log.debug(events.PREPARE_VOTED, participant=branch.name, vote="no")
    if failed:
        raise _Abort(f"participant {failed[0].name!r} voted NO: {failed[0].failure}")


def _commit_read_only(
    tx: Transaction, cfg: DriverConfig
) -> tuple[list[XABranch], LastResourceSession | None, XABranch | None]:
    """Commit the branches that wrote nothing (they leave the protocol); return the
    writers to prepare, the broker's session if it has work, and the branch that
    carries the decision row when the decision is a row (else None)."""
    writers: list[XABranch] = []
    idle: list[XABranch] = []
    with tx.timed("prepare"):
        for branch in tx.branches.values():
            (idle if branch.read_only() else writers).append(branch)
        broker = tx.broker if tx.broker is not None and tx.broker.has_work else None
        carrier = _decision_carrier(tx, cfg, writers, idle, broker)
        for branch in idle:
            if branch is not carrier:
                branch.commit_one_phase()
                if tx.debug:
                    tx.log.debug(events.PREPARE_VOTED, participant=branch.name, vote="read-only")
    if tx.broker is not None and broker is None:
        tx.broker.abort()  # nothing was sent: nothing to commit
    return [b for b in writers if b is not carrier], broker, carrier


def _decision_carrier(
    tx: Transaction,
    cfg: DriverConfig,
    writers: list[XABranch],
    idle: list[XABranch],
    broker: LastResourceSession | None,
) -> XABranch | None:
    """The commit-markable participant's branch, when the decision will be its row.

    Only without a broker writer (the marker decides then), with a decision holder,
    and with two writers or more (one commits one-phase alone). A transaction that
    did not touch that participant gets a branch there for the row only.
    """
    table = cfg.decision_holder
    if table is None or broker is not None or len(writers) < 2:
        return None
    for branch in (*writers, *idle):
        if branch.name == table.participant:
            return branch
    return tx.branch(table.participant)


def _prepare_all(
    tx: Transaction,
    cfg: DriverConfig,
    writers: list[XABranch],
    broker: LastResourceSession | None,
) -> None:
    """Phase 1: prepare every XA writer at once; any NO vote or failure aborts.

    PREPARE takes no new lock, so it may run on every branch at the same time;
    the work itself never does (docs/design.md §2: that deadlocks across databases).
    The broker may send its messages meanwhile, ahead of the commit point.
    """
    tx.handle(TxEvent.PREPARE)
    if tx.debug:  # a branch that may be prepared before phase 1 was prepared early
        tx.log.debug(
            events.PREPARE_STARTED,
            participants=[b.name for b in writers],
            prepared_early=[b.name for b in writers if b.left_prepared],
        )
    with tx.timed("prepare"):
        for branch in writers:
            branch.send_prepare()
        if broker is not None:
            broker.send_ahead()
        votes = cfg.run_each([partial(_prepare_one, b, cfg) for b in writers])
    refusals = [v for v in votes if isinstance(v, BaseException)]
    if tx.timed_out:  # the watchdog cancelled phase 1 (work deferred to it waited)
        cause = f" (phase 1 failed: {refusals[0]})" if refusals else ""
        raise _Abort("the transaction exceeded its timeout during phase 1" + cause)
    if refusals:
        raise _Abort(f"phase 1 failed: {refusals[0]}")
    if time.monotonic() > tx.deadline:
        raise _Abort("the transaction exceeded its timeout during phase 1")


def _step_to_commit_point(tx: Transaction) -> None:
    """The transaction is at its commit point from here, unless the watchdog timed it out
    first (its deadline passed after the last check): then it aborts."""
    if not tx.reach_commit_point():
        raise _Abort("the transaction exceeded its timeout before its commit point")


def _check_liveness(tx: Transaction, cfg: DriverConfig) -> None:
    """A coordinator that lost its liveness lock may be being fenced: it must not decide."""
    if not cfg.may_decide():
        tx.log.warning(events.LIVENESS_LOST)
        raise _Abort(
            "this coordinator lost its liveness lock (a peer may be recovering it); "
            "it reaches no commit point until it holds the lock again"
        )


def _prepare_one(branch: XABranch, cfg: DriverConfig) -> None:
    branch.prepare()
    cfg.failpoint("after_prepare")


def _reach_commit_point(
    tx: Transaction,
    cfg: DriverConfig,
    writers: list[XABranch],
    broker: LastResourceSession | None,
    carrier: XABranch | None,
) -> None:
    """The decision becomes durable: the broker's marker commit, the commit of the
    branch carrying the decision row, or a forced log record."""
    _step_to_commit_point(tx)
    prepared = [b.name for b in writers]
    if broker is not None:
        if tx.debug:
            tx.log.debug(events.COMMIT_POINT_STARTED, via="broker-marker", participant=broker.name)
        with tx.timed("commit_point"):
            _commit_marker(tx, cfg, broker)
        tx.decided(by_marker=True)
        if tx.debug:
            tx.log.debug(events.COMMIT_POINT_REACHED, via="broker-marker")
        with tx.timed("decision_log"):  # the marker is the decision: the record may be lazy
            try:
                cfg.log_commit(
                    tx.gtrid, commit_record_participants(prepared, broker.name), force=False
                )
            except DecisionLogError as exc:  # decided all the same: the backlog writes it
                _log_failed(tx, exc, "COMMIT")
    elif carrier is not None:
        if tx.debug:
            tx.log.debug(events.COMMIT_POINT_STARTED, via="decision-row", participant=carrier.name)
        with tx.timed("commit_point"):
            _commit_decision_row(tx, cfg, carrier)
        tx.decided(by_marker=False)
        if tx.debug:
            tx.log.debug(events.COMMIT_POINT_REACHED, via="decision-row")
    else:
        if tx.debug:
            tx.log.debug(events.COMMIT_POINT_STARTED, via="decision-log")
        with tx.timed("decision_log"):
            try:
                cfg.log_commit(tx.gtrid, commit_record_participants(prepared, None), force=True)
            except RecordNotDurable as exc:  # written, maybe not durable: the reopened log tells
                _log_failed(tx, exc, "COMMIT")
                raise _Doubt(f"the COMMIT record may not be durable: {exc}") from exc
            except DecisionLogError as exc:  # nothing of the record is in the log
                _log_failed(tx, exc, "COMMIT")
                raise _Abort(f"the decision log could not be written: {exc}") from exc
        tx.decided(by_marker=False)
        if tx.debug:
            tx.log.debug(events.COMMIT_POINT_REACHED, via="decision-log")
    if tx.debug:
        tx.log.debug(
            events.DECISION_LOGGED, participants=prepared, forced=broker is None and carrier is None
        )


def _commit_decision_row(tx: Transaction, cfg: DriverConfig, carrier: XABranch) -> None:
    """The row ``(gtrid)`` goes into the carrier's own branch, which commits one-phase.

    A failed INSERT or a refused commit decided nothing (abort); a commit with no
    answer is in doubt: only the row, read once that session is gone, tells. The
    commit is never retried on another session (a fenced zombie must not decide).
    """
    holder = cfg.decision_holder
    assert holder is not None
    try:
        holder.mark(carrier, tx.gtrid)
    except Exception as exc:  # whatever the database said: nothing is committed
        raise _Abort(
            f"participant {carrier.name!r} could not take the decision row: {exc}"
        ) from exc
    tx.carries_decision(carrier.name)
    cfg.failpoint("before_decision_row_commit")
    try:
        carrier.commit_one_phase()
    except CommitRefused as exc:
        tx.log.warning(events.COMMIT_POINT_REFUSED, participant=carrier.name, error=str(exc))
        raise _Abort(f"participant {carrier.name!r} refused the commit: {exc}") from exc
    except ParticipantError as exc:
        tx.log.warning(events.COMMIT_POINT_UNKNOWN, participant=carrier.name, error=str(exc))
        raise _Doubt(f"no answer to the commit of the decision row ({exc})") from exc
    cfg.failpoint("after_decision_row_commit")


def _commit_marker(tx: Transaction, cfg: DriverConfig, broker: LastResourceSession) -> None:
    try:
        broker.commit_with_marker(
            tx.gtrid,
            cfg.receipt_timeout,
            before_commit=partial(cfg.failpoint, "before_broker_commit"),
            commit_sent=partial(cfg.failpoint, "after_broker_commit"),
        )
    except CommitRefused as exc:
        tx.log.warning(events.COMMIT_POINT_REFUSED, participant=broker.name, error=str(exc))
        raise _Abort(f"the broker refused the commit: {exc}") from exc
    except HeuristicMixed as exc:
        # The broker committed without one of the transaction's messages: whether the
        # marker went in decides the databases, and only recovery can read it.
        tx.log.warning(events.COMMIT_POINT_HEURISTIC, participant=broker.name, error=str(exc))
        raise _Doubt(f"heuristic outcome at the broker's COMMIT ({exc})") from exc
    except (OutcomeUnknown, ParticipantError) as exc:
        tx.log.warning(events.COMMIT_POINT_UNKNOWN, participant=broker.name, error=str(exc))
        raise _Doubt(f"no answer to the broker's COMMIT ({exc})") from exc


def _phase2(tx: Transaction, cfg: DriverConfig, writers: list[XABranch]) -> bool:
    """COMMIT PREPARED everywhere at once; False if some of it is left for later."""
    with tx.timed("phase2"):
        for branch in writers:
            branch.send_commit_prepared()
        results = cfg.run_each([partial(_commit_prepared, tx, b, cfg) for b in writers])
    errors = [str(r) for r in results if isinstance(r, BaseException)]
    if errors:
        tx.log.warning(events.PHASE2_DEFERRED, errors=errors)
    return not errors


def _commit_prepared(tx: Transaction, branch: XABranch, cfg: DriverConfig) -> None:
    for attempt in range(1, cfg.phase2_attempts + 1):
        try:
            branch.commit_prepared()
        except ParticipantError as exc:
            if attempt == cfg.phase2_attempts:
                raise
            tx.log.info(
                events.PHASE2_RETRY, participant=branch.name, attempt=attempt, error=str(exc)
            )
            sleep(cfg.phase2_backoff * attempt)
            continue
        if tx.debug:
            tx.log.debug(events.PHASE2_COMMITTED, participant=branch.name)
        cfg.failpoint("after_commit_prepared")
        return


def _end(tx: Transaction, cfg: DriverConfig) -> None:
    cfg.failpoint("before_end")
    try:
        cfg.log_end(tx.gtrid)
    except DecisionLogError as exc:  # committed all the same: the backlog writes END later
        _log_failed(tx, exc, "END")
        cfg.defer(tx)
        return
    tx.handle(TxEvent.END)
    if tx.debug:
        tx.log.debug(events.END)


def _log_failed(tx: Transaction, exc: DecisionLogError, record: str) -> None:
    """Keep the first log failure on ``tx`` (its caller may stop on it) and say so."""
    tx.log_failure = tx.log_failure or exc
    tx.log.warning(events.LOG_WRITE_FAILED, record=record, error=str(exc))


def _commit_one_phase(
    tx: Transaction,
    cfg: DriverConfig,
    writers: list[XABranch],
    broker: LastResourceSession | None,
) -> Outcome:
    """Zero or one writer: no phase 1, no log; the writer's own commit decides."""
    _step_to_commit_point(tx)
    try:
        with tx.timed("commit_point"):
            if broker is not None:
                if tx.debug:
                    tx.log.debug(events.ONE_PHASE, participant=broker.name)
                broker.commit(cfg.receipt_timeout)
            for branch in writers:
                if tx.debug:
                    tx.log.debug(events.ONE_PHASE, participant=branch.name)
                branch.commit_one_phase()
    except CommitRefused as exc:
        raise _Abort(f"one-phase commit refused: {exc}") from exc
    except ParticipantError as exc:
        tx.log.warning(events.COMMIT_POINT_UNKNOWN, error=str(exc))
        raise _Doubt(f"no answer to the one-phase commit of the only writer ({exc})") from exc
    tx.decided(by_marker=False)
    tx.handle(TxEvent.END)
    return Outcome.COMMITTED
