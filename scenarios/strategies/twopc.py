"""The 2PC strategy: one global transaction over A, B and the broker, run by the coordinator."""

from __future__ import annotations

import time
from typing import Any

from coordinator import failpoints
from coordinator.coordinator import Coordinator
from coordinator.errors import ConfigurationError, CrashInjected
from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.crash_plan import CrashAction
from scenarios.outbox.relay_modes import RelayMode
from scenarios.strategies.transfer_2pc import transfer_2pc
from scenarios.transfer.destinations import EVENT_QUEUES
from scenarios.transfer.model import Transfer
from scenarios.wiring import open_coordinator


class TwoPhaseCommitStrategy:
    """:func:`transfer_2pc` on a coordinator from :func:`scenarios.wiring.open_coordinator`.

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
        from scenarios.outbox.fanout import ensure_queues

        self.close()
        ensure_queues(settings, EVENT_QUEUES)  # a queue created later misses the events before
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

    def stats(self) -> dict[str, Any]:
        if self.coordinator is None:
            return {}
        return {"coordinator": dict(self.coordinator.stats())}

    def close(self) -> None:
        if self.coordinator is not None:
            self.coordinator.close()
            self.coordinator = None
