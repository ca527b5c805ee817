"""The transfer strategies by name: 2PC, the two outboxes, CDC and the naive dual write.

``STRATEGIES`` maps each name to a factory of a fresh :class:`Strategy`
(see scenarios.strategies.base for the protocol, and
scenarios.strategies.pipeline for the relays and consumer the asynchronous
ones need). :func:`run_transfers` is what ``twopc transfer --strategy``
runs for every strategy but 2PC.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from coordinator import failpoints
from coordinator.coordinator import Coordinator
from coordinator.errors import ConfigurationError, CrashInjected
from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.strategies.base import CrashAction, RelayMode, Strategy
from scenarios.strategies.cdc import CdcStrategy
from scenarios.strategies.naive import NaiveStrategy
from scenarios.strategies.outbox import OutboxLastIdStrategy, OutboxStatusStrategy
from scenarios.transfer import Transfer, run_batch, transfer_2pc

__all__ = ["STRATEGIES", "Strategy", "TwoPhaseCommitStrategy", "new_strategy", "run_transfers"]


class TwoPhaseCommitStrategy:
    """scenarios.transfer.transfer_2pc on a coordinator from scenarios.wiring.open_coordinator.

    Crash points are the coordinator's failpoints; only ``kill`` is offered (an
    in-process crash leaves the coordinator's own sessions holding the broker
    client-ids that recovery must fence): run the transfers in a child process
    and then ``twopc recover``.
    """

    name = "2pc"
    relay_mode: RelayMode | None = None
    crash_points: tuple[str, ...] = failpoints.NAMES

    def __init__(self) -> None:
        self.committed_at: dict[str, float] = {}
        self.coordinator: Coordinator | None = None

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        from scenarios.wiring import open_coordinator

        self.close()
        self.coordinator = open_coordinator(settings, sessions=max(concurrency, 1))

    def arm_crash(self, point: str, *, every: int = 1, action: CrashAction = "abandon") -> None:
        if action != "kill":
            raise ConfigurationError(
                "the 2pc strategy crashes only with action='kill' (in a child process; "
                "then run 'twopc recover')"
            )
        failpoints.arm(point, "kill", on_hit=every)

    def run_one(self, transfer: Transfer) -> tuple[Outcome, str]:
        if self.coordinator is None:
            raise RuntimeError("strategy 2pc: call prepare(settings) before run_one")
        try:
            outcome, reason = transfer_2pc(self.coordinator, transfer)
        except CrashInjected as exc:
            return Outcome.IN_DOUBT, f"crash injected: {exc}"
        if outcome is Outcome.COMMITTED:
            self.committed_at[transfer.transfer_id] = time.time()
        return outcome, reason

    def close(self) -> None:
        if self.coordinator is not None:
            self.coordinator.close()
            self.coordinator = None


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "2pc": TwoPhaseCommitStrategy,
    "outbox-status": OutboxStatusStrategy,
    "outbox-last-id": OutboxLastIdStrategy,
    "cdc": CdcStrategy,
    "naive": NaiveStrategy,
}


def new_strategy(name: str) -> Strategy:
    """A fresh, unprepared strategy called ``name``."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigurationError(
            f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}"
        ) from None


def run_transfers(
    settings: Settings,
    name: str,
    transfers: Sequence[Transfer],
    *,
    concurrency: int,
    check: bool = True,
    converge_timeout: float = 120.0,
) -> dict[str, Any]:
    """Run ``transfers`` with strategy ``name``; the result as ``twopc transfer`` prints it.

    An asynchronous strategy gets one relay and the consumer in this process
    for the run (relays already running elsewhere share the work), and the
    result says how long B took to converge.
    """
    from scenarios.strategies import pipeline

    strategy = new_strategy(name)
    strategy.prepare(settings, concurrency=concurrency)
    running = None
    if strategy.relay_mode is not None:
        running = pipeline.Pipeline(settings, strategy.relay_mode).start()
    output: dict[str, Any] = {"strategy": name}
    try:
        result = run_batch(transfers, strategy.run_one, concurrency=concurrency)
        output.update(result.as_dict())
        if running is not None:
            ids = set(strategy.committed_at)
            missing = pipeline.wait_converged(settings, ids, timeout=converge_timeout)
            latencies = pipeline.convergence_latencies(settings, strategy.committed_at)
            from scenarios.transfer import percentiles

            output["convergence_ms"] = percentiles(list(latencies.values()))
            output["not_converged"] = len(missing)
    finally:
        if running is not None:
            running.stop()
        strategy.close()
    if check:
        if strategy.relay_mode is None:
            from scenarios.transfer import gather_evidence

            output["invariants"] = gather_evidence(settings).as_dict()
        else:
            output["invariants"] = pipeline.gather_outbox_evidence(settings).as_dict()
    return output
