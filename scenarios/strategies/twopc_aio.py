"""The 2PC strategy on asyncio (``twopc transfer --api asyncio``): the same transfer
(:mod:`scenarios.strategies.transfer_2pc_aio`) on the asyncio coordinator the settings
describe (:func:`scenarios.wiring.open_async_coordinator`), the batch's transfers as tasks
on one event loop (:mod:`scenarios.transfer.batch_aio`).

It has no ``run_one`` for threads: :meth:`AsyncTwoPhaseCommitStrategy.run_batch` runs a
whole batch, from opening the coordinator (and its recovery) to closing it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from coordinator.errors import ConfigurationError
from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.outbox.relay_modes import RelayMode
from scenarios.strategies.transfer_2pc_aio import transfer_2pc
from scenarios.transfer.batch_aio import run_batch
from scenarios.transfer.destinations import EVENT_QUEUES
from scenarios.transfer.model import Transfer
from scenarios.transfer.results import BatchResult
from scenarios.wiring import open_async_coordinator


def require_asyncio_version(strategy: str) -> None:
    """ConfigurationError unless ``strategy`` has an asyncio version (2pc alone has)."""
    if strategy != AsyncTwoPhaseCommitStrategy.name:
        raise ConfigurationError(
            f"--api asyncio runs the 2pc strategy only: {strategy!r} has no asyncio "
            "version; leave --api at threads for it"
        )


class AsyncTwoPhaseCommitStrategy:
    """:func:`transfer_2pc` (asyncio) on an ``AsyncCoordinator``, a batch at a time."""

    name = "2pc"
    relay_mode: RelayMode | None = None

    def __init__(self) -> None:
        self.committed_at: dict[str, float] = {}
        self._settings: Settings | None = None
        self._stats: dict[str, Any] = {}

    def prepare(self, settings: Settings, *, concurrency: int = 8) -> None:
        from scenarios.outbox.fanout import ensure_queues

        ensure_queues(settings, EVENT_QUEUES)  # a queue created later misses the events before
        self._settings = settings

    def run_batch(
        self,
        transfers: Sequence[Transfer],
        *,
        concurrency: int,
        on_done: Callable[[], None] | None = None,
        stop: threading.Event | None = None,
    ) -> BatchResult:
        """Open the coordinator (``concurrency`` broker sessions; its recovery runs first),
        run ``transfers`` ``concurrency`` at a time as tasks, close it."""
        if self._settings is None:
            raise RuntimeError("strategy 2pc (asyncio): call prepare(settings) before run_batch")
        return asyncio.run(self._run(self._settings, transfers, concurrency, on_done, stop))

    async def _run(
        self,
        settings: Settings,
        transfers: Sequence[Transfer],
        concurrency: int,
        on_done: Callable[[], None] | None,
        stop: threading.Event | None,
    ) -> BatchResult:
        coordinator = open_async_coordinator(settings, sessions=max(concurrency, 1))
        async with coordinator:

            async def run_one(transfer: Transfer) -> tuple[Outcome, str]:
                outcome, reason = await transfer_2pc(coordinator, transfer)
                if outcome is Outcome.COMMITTED:
                    self.committed_at[transfer.transfer_id] = time.time()
                return outcome, reason

            try:
                return await run_batch(
                    transfers, run_one, concurrency=concurrency, on_done=on_done, stop=stop
                )
            finally:
                self._stats = {"coordinator": dict(coordinator.stats())}

    def stats(self) -> dict[str, Any]:
        return self._stats

    def close(self) -> None:
        """Nothing stays open between batches: the coordinator closes with its batch."""
