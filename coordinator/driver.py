"""The commit sequence of one global transaction: prepare -> commit point -> log -> phase 2.

Presumed abort (DESIGN §2): nothing is logged for an abort; the commit point
is the broker's COMMIT of the transaction carrying the commit marker, or,
without a broker writer, the forced COMMIT record in the decision log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from coordinator import events
from coordinator.errors import (
    CommitRefused,
    CrashInjected,
    OutcomeUnknown,
    ParticipantError,
    TwoPhaseCommitError,
)
from coordinator.log import DecisionLog
from coordinator.protocol import XABranch
from coordinator.states import Outcome, TxState
from coordinator.transaction import Transaction

T = TypeVar("T")


@dataclass
class DriverConfig:
    """What the commit sequence needs from its coordinator."""

    log: DecisionLog
    executor: Executor
    failpoint: Callable[[str], None]
    receipt_timeout: float = 5.0
    phase2_attempts: int = 3
    phase2_backoff: float = 0.05
    defer: Callable[[Transaction], None] = lambda tx: None  # phase 2 left for later


def _submit(executor: Executor, call: Callable[[], T]) -> Future[T]:
    """``call`` on the executor, or here and now once it is shut down (a closed coordinator)."""
    try:
        return executor.submit(call)
    except RuntimeError:
        done: Future[T] = Future()
        try:
            done.set_result(call())
        except BaseException as exc:
            done.set_exception(exc)
        return done


def run_parallel(executor: Executor, calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run ``calls`` at once (the last one on this thread); return results or exceptions."""
    futures: list[Future[T]] = [_submit(executor, call) for call in calls[:-1]]
    results: list[T | BaseException] = []
    last: T | BaseException
    try:
        last = calls[-1]()
    except BaseException as exc:
        last = exc
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:
            results.append(exc)
    results.append(last)
    for item in results:  # an injected crash on any thread is a crash of the process
        if isinstance(item, CrashInjected):
            raise item
    return results


def _timed(tx: Transaction, phase: str, start: float) -> None:
    tx.timings[phase] = tx.timings.get(phase, 0.0) + time.perf_counter() - start


def commit(tx: Transaction, cfg: DriverConfig) -> Outcome:
    """Commit ``tx``; every exit path leaves it COMMITTED/COMPLETED, ABORTED or IN_DOUBT."""
    log = tx.log
    if tx.timed_out or time.monotonic() > tx.deadline:
        return abort(tx, cfg, "the transaction exceeded its timeout before its commit point")
    failed = [b for b in tx.branches.values() if getattr(b, "failure", None) is not None]
    if failed:
        for b in failed:
            log.debug(events.PREPARE_VOTED, participant=b.name, vote="no")
        return abort(
            tx, cfg, f"participant {failed[0].name!r} voted NO: {getattr(failed[0], 'failure', '')}"
        )

    start = time.perf_counter()
    writers: list[XABranch] = []
    for branch in tx.branches.values():
        if branch.read_only():
            branch.commit_one_phase()
            log.debug(events.PREPARE_VOTED, participant=branch.name, vote="read-only")
        else:
            writers.append(branch)
    broker = tx.broker if tx.broker is not None and tx.broker.has_work else None
    if tx.broker is not None and broker is None:
        tx.broker.abort()  # nothing was sent: nothing to commit
    if len(writers) + (broker is not None) <= 1:
        return _commit_one_phase(tx, cfg, writers, start)

    # Phase 1: prepare every XA writer in parallel.
    tx.move(TxState.PREPARING)
    log.debug(events.PREPARE_STARTED, participants=[b.name for b in writers])
    votes = run_parallel(cfg.executor, [partial(_prepare_one, b, cfg) for b in writers])
    _timed(tx, "prepare", start)
    refusals = [v for v in votes if isinstance(v, BaseException)]
    if refusals:
        return abort(tx, cfg, f"phase 1 failed: {refusals[0]}")
    if time.monotonic() > tx.deadline:
        return abort(tx, cfg, "the transaction exceeded its timeout during phase 1")

    # The commit point.
    tx.move(TxState.COMMITTING)
    start = time.perf_counter()
    participants = [b.name for b in writers]
    if broker is not None:
        log.debug(events.COMMIT_POINT_STARTED, via="broker-marker", participant=broker.name)
        try:
            broker.commit_with_marker(tx.gtrid, cfg.receipt_timeout)
        except CommitRefused as exc:
            log.warning(events.COMMIT_POINT_REFUSED, participant=broker.name, error=str(exc))
            return abort(tx, cfg, f"the broker refused the commit: {exc}")
        except (OutcomeUnknown, ParticipantError) as exc:
            log.warning(events.COMMIT_POINT_UNKNOWN, participant=broker.name, error=str(exc))
            tx.move(TxState.IN_DOUBT)
            tx.reason = f"no answer to the broker's COMMIT ({exc})"
            return Outcome.IN_DOUBT
        tx.marker_sent = True
        _timed(tx, "commit_point", start)
        log.debug(events.COMMIT_POINT_REACHED, via="broker-marker")
        # The marker is the durable decision; the log record may be lazy.
        start = time.perf_counter()
        cfg.log.log_commit(tx.gtrid, [*participants, broker.name], force=False)
        _timed(tx, "decision_log", start)
    else:
        log.debug(events.COMMIT_POINT_STARTED, via="decision-log")
        try:
            cfg.log.log_commit(tx.gtrid, participants, force=True)
        except TwoPhaseCommitError as exc:  # FsyncFailed is fatal: the caller must stop
            tx.move(TxState.IN_DOUBT)
            tx.reason = f"the decision log failed: {exc}"
            raise
        _timed(tx, "decision_log", start)
        log.debug(events.COMMIT_POINT_REACHED, via="decision-log")
    tx.move(TxState.COMMITTED)
    log.debug(events.DECISION_LOGGED, participants=participants, forced=broker is None)
    cfg.failpoint("after_decision")

    # Phase 2: never turns into an abort.
    start = time.perf_counter()
    results = run_parallel(cfg.executor, [partial(_commit_prepared, tx, b, cfg) for b in writers])
    _timed(tx, "phase2", start)
    if any(isinstance(r, BaseException) for r in results):
        log.warning(
            events.PHASE2_DEFERRED, errors=[str(r) for r in results if isinstance(r, BaseException)]
        )
        cfg.defer(tx)
        return Outcome.COMMITTED
    cfg.failpoint("before_end")
    cfg.log.log_end(tx.gtrid)
    tx.move(TxState.COMPLETED)
    log.debug(events.END)
    return Outcome.COMMITTED


def _prepare_one(branch: XABranch, cfg: DriverConfig) -> None:
    branch.prepare()
    cfg.failpoint("after_prepare")


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
            time.sleep(cfg.phase2_backoff * attempt)
            continue
        tx.log.debug(events.PHASE2_COMMITTED, participant=branch.name)
        cfg.failpoint("after_commit_prepared")
        return


def _commit_one_phase(
    tx: Transaction, cfg: DriverConfig, writers: list[XABranch], start: float
) -> Outcome:
    """Zero or one writer: no phase 1, no log; the writer's own commit decides."""
    tx.move(TxState.COMMITTING)
    broker = tx.broker if tx.broker is not None and tx.broker.has_work else None
    try:
        if broker is not None:
            tx.log.debug(events.ONE_PHASE, participant=broker.name)
            broker.commit(cfg.receipt_timeout)
        for branch in writers:
            tx.log.debug(events.ONE_PHASE, participant=branch.name)
            branch.commit_one_phase()
    except CommitRefused as exc:
        return abort(tx, cfg, f"one-phase commit refused: {exc}")
    except ParticipantError as exc:
        # The only writer's commit got no clear answer: the outcome is unknown.
        tx.move(TxState.IN_DOUBT)
        tx.reason = f"no answer to the one-phase commit of the only writer ({exc})"
        tx.log.warning(events.COMMIT_POINT_UNKNOWN, error=str(exc))
        return Outcome.IN_DOUBT
    _timed(tx, "commit_point", start)
    tx.move(TxState.COMMITTED)
    tx.move(TxState.COMPLETED)
    return Outcome.COMMITTED


def abort(tx: Transaction, cfg: DriverConfig, reason: str) -> Outcome:
    """Roll back every branch (active or prepared) and the broker; nothing is logged."""
    tx.move(TxState.ABORTING)
    tx.reason = tx.reason or reason
    tx.log.info(events.ABORT, reason=reason)
    branches = list(tx.branches.values())
    if branches:
        run_parallel(cfg.executor, [b.rollback for b in branches])
    if tx.broker is not None:
        tx.broker.abort()
    tx.move(TxState.ABORTED)
    return Outcome.ABORTED
