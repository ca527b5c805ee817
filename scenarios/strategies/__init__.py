"""The transfer strategies by name: 2PC, the two outboxes, CDC, the batch job, the thread pool
(and its synchronous remedy), the naive dual write and its variant that sends before commit.

``STRATEGIES`` maps each name to a factory of a fresh :class:`Strategy`
(see scenarios.strategies.base for the protocol, one module per strategy, and
scenarios.outbox.pipeline for the relays and consumer the asynchronous
ones need). :func:`run_transfers` is what ``twopc transfer --strategy``
runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from scenarios.config import Settings
from scenarios.strategies.base import Strategy
from scenarios.strategies.batch import BatchStrategy
from scenarios.strategies.cdc import CdcFanoutStrategy, CdcStrategy
from scenarios.strategies.naive import NaiveSendFirstStrategy, NaiveStrategy
from scenarios.strategies.outbox import OutboxLastIdStrategy, OutboxStatusStrategy
from scenarios.strategies.thread import ThreadStrategy, ThreadSyncStrategy
from scenarios.strategies.twopc import TwoPhaseCommitStrategy
from scenarios.strategies.twopc_aio import AsyncTwoPhaseCommitStrategy, require_asyncio_version
from scenarios.transfer.batch import run_batch
from scenarios.transfer.invariants import gather_evidence
from scenarios.transfer.model import Transfer
from scenarios.transfer.results import percentiles

__all__ = [
    "STRATEGIES",
    "RunFailed",
    "Strategy",
    "TwoPhaseCommitStrategy",
    "new_strategy",
    "run_transfers",
]


class RunFailed(TwoPhaseCommitError):
    """The transfers ran, then what followed (convergence, the checks) raised: its cause.

    ``output`` holds the results gathered so far, for the command to print.
    """

    def __init__(self, output: dict[str, Any]) -> None:
        super().__init__("the run's checks failed")
        self.output = output


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "2pc": TwoPhaseCommitStrategy,
    "outbox-status": OutboxStatusStrategy,
    "outbox-last-id": OutboxLastIdStrategy,
    "cdc": CdcStrategy,
    "cdc-fanout": CdcFanoutStrategy,
    "naive": NaiveStrategy,
    "naive-send-first": NaiveSendFirstStrategy,
    "batch": BatchStrategy,
    "thread": ThreadStrategy,
    "thread-sync": ThreadSyncStrategy,
}


def new_strategy(name: str) -> Strategy:
    """A fresh, unprepared strategy called ``name``."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigurationError(
            f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}"
        ) from None


def fanout_report(
    settings: Settings, committed_at: dict[str, float], running: Any, timeout: float = 120.0
) -> dict[str, Any]:
    """Per consumer of the fan-out: the credit command's receiver, then each event consumer,
    with its lag (ms from A's commit to its processing) once all caught up.

    Also how far each consumer had got when the credit consumer had converged:
    the slow one behind, the others done.
    """
    from scenarios.outbox import fanout

    names = (fanout.CREDIT, *running.fanout)
    when_credited = fanout.processed_counts(settings, committed_at, names)
    missing = fanout.wait_all(settings, committed_at, names, timeout=timeout, check=running.check)
    lags = fanout.fanout_lags(settings, committed_at, names)
    consumers = {
        name: {
            "kind": "command" if name == fanout.CREDIT else "event",
            "lag_ms": percentiles(list(lags[name].values())),
            "processed_when_b_converged": when_credited[name],
            "not_processed": len(missing[name]),
        }
        for name in names
    }
    return {"consumers": consumers, "duplicate_effects": fanout.duplicate_effects(settings)}


def converge_commands(strategy: Any, consumer: str) -> str:
    """The commands that make ``strategy`` converge when ``twopc transfer`` starts none."""
    if strategy.relay_mode == "batch":
        return "'twopc batch'"
    relay = f"'twopc relay --mode {strategy.relay_mode}'"
    fanout: tuple[str, ...] = tuple(getattr(strategy, "fanout", ()))
    if fanout:  # B's credit is the command's consumer; the events have their own
        consumers = ", ".join(f"'twopc fanout --consumer {name}'" for name in fanout)
        return f"{relay}, 'twopc consumer --mode {consumer}' and {consumers}"
    return f"{relay} and 'twopc consumer --mode {consumer}'"


def run_transfers(
    settings: Settings,
    name: str,
    transfers: Sequence[Transfer],
    *,
    concurrency: int,
    check: bool = True,
    converge_timeout: float = 120.0,
    pipeline_here: bool = True,
    consumer: str = "inbox",
    stop: threading.Event | None = None,
    on_done: Callable[[], None] | None = None,
    api: str = "threads",
) -> dict[str, Any]:
    """Run ``transfers`` with strategy ``name``; the result as ``twopc transfer`` prints it.

    ``api`` "asyncio" (2pc only): the asyncio coordinator runs the batch, its transfers as
    tasks on one event loop (scenarios.strategies.twopc_aio); "threads": ``concurrency``
    threads call the strategy's ``run_one``.

    An asynchronous strategy gets one relay and the consumer in this process
    for the run (relays already running elsewhere share the work), or the
    batch job, and the result says how long B took to converge. For the thread
    pool, that is how long its queued work took after the caller heard
    "committed".

    ``pipeline_here`` False (``--no-pipeline``): only write; relays and consumers run
    elsewhere (``twopc relay``, ``twopc consumer --mode <consumer>``) and the checks
    wait up to ``converge_timeout`` for the convergence they bring about; if it does
    not come, ``convergence_error`` says what is missing and what to start. With
    ``check`` False as well, nothing waits for B: the run ends when A has its writes.

    ``stop`` set (SIGTERM, SIGINT: scenarios.stopping): the transfers in hand
    finish, no more start (``not_started``), B's convergence is not waited for,
    and an asynchronous strategy's checks are left out (``checks_skipped``).
    ``on_done`` is called after each transfer (a progress bar).
    """
    from scenarios.outbox import pipeline

    strategy: Strategy | AsyncTwoPhaseCommitStrategy
    if api == "asyncio":
        require_asyncio_version(name)
        strategy = AsyncTwoPhaseCommitStrategy()
    else:
        strategy = new_strategy(name)
    strategy.prepare(settings, concurrency=concurrency)
    running = None
    if strategy.relay_mode is not None and pipeline_here:
        running = pipeline.for_strategy(settings, strategy).start()
    output: dict[str, Any] = {"strategy": name, "api": api}
    try:
        if isinstance(strategy, AsyncTwoPhaseCommitStrategy):
            result = strategy.run_batch(
                transfers, concurrency=concurrency, on_done=on_done, stop=stop
            )
        else:
            result = run_batch(
                transfers, strategy.run_one, concurrency=concurrency, on_done=on_done, stop=stop
            )
        output.update(result.as_dict())
        drain = getattr(strategy, "drain", None)
        if drain is not None:  # the pool's work, the caller did not wait for
            drain(converge_timeout)
            converged_at: dict[str, float] = getattr(strategy, "converged_at", {})
            lags = [
                max(0.0, (converged_at[t] - at) * 1000)
                for t, at in strategy.committed_at.items()
                if t in converged_at
            ]
            output["convergence_ms"] = percentiles(lags)
        output.update(strategy.stats())
        if strategy.relay_mode is not None and (check or running is not None):
            ids = set(strategy.committed_at)
            missing = pipeline.wait_converged(
                settings,
                ids,
                timeout=converge_timeout,
                check=running.check if running is not None else None,
                consumer=consumer,
                stop=stop,
            )
            latencies = pipeline.convergence_latencies(settings, strategy.committed_at, consumer)
            output["convergence_ms"] = percentiles(list(latencies.values()))
            output["not_converged"] = len(missing)
            if missing and running is None and not stopped(stop):
                output["convergence_error"] = (
                    f"{len(missing)} of {len(ids)} transfers (e.g. {min(missing)}) were not "
                    f"credited in B within {converge_timeout:g} s: with --no-pipeline, run "
                    f"{converge_commands(strategy, consumer)} elsewhere"
                )
            if running is not None and running.fanout and not stopped(stop):
                output["fanout"] = fanout_report(settings, strategy.committed_at, running)
    except Exception as exc:
        if "committed" not in output:  # the transfers themselves did not run
            raise
        raise RunFailed(output) from exc
    finally:
        if running is not None:
            running.stop()
        strategy.close()
    inbox = strategy.relay_mode is not None
    if check and inbox and stopped(stop):
        output["checks_skipped"] = "the run was stopped before B converged"
    elif check:
        try:
            evidence = gather_evidence(settings, inbox=inbox, consumer=consumer)
        except Exception as exc:
            raise RunFailed(output) from exc
        output["invariants"] = evidence.as_dict()
    return output


def stopped(stop: threading.Event | None) -> bool:
    """True once the run was told to stop."""
    return stop is not None and stop.is_set()
