"""A blocking portal onto the asyncio API, so the sync suites run the same checks against it.

Each call runs the coroutine to completion on one private event loop; the
objects have the surface of the sync :class:`~coordinator.Coordinator`,
:class:`~coordinator.Transaction` and participants that the suites use.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine
from typing import Any, TypeVar

from coordinator.aio import AsyncCoordinator, AsyncTransaction

T = TypeVar("T")


class Portal:
    """One private event loop; :meth:`run` runs a coroutine on it to completion."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


class Blocking:
    """Any asyncio object seen through the portal: its coroutine methods block and return.

    A result that is itself an asyncio participant object (a branch, a session)
    is wrapped too, so a chain of calls reads as in the sync API.
    """

    def __init__(self, portal: Portal, target: Any) -> None:
        self._portal = portal
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not inspect.iscoroutinefunction(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            result = self._portal.run(value(*args, **kwargs))
            if type(result).__module__.startswith("participants.aio"):
                return Blocking(self._portal, result)
            return result

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or callable(value):
            object.__setattr__(self, name, value)  # private, or a sync call put in its place
        else:
            setattr(self._target, name, value)


class BlockingCoordinator(Blocking):
    """An AsyncCoordinator through the portal: begin() hands out blocking transactions."""

    def __init__(self, portal: Portal, coordinator: AsyncCoordinator) -> None:
        super().__init__(portal, coordinator)
        portal.run(coordinator.start())

    def begin(self, gtrid: str | None = None, **kwargs: Any) -> Blocking:
        tx: AsyncTransaction = self._target.begin(gtrid, **kwargs)
        return Blocking(self._portal, tx)

    def bury(self) -> None:
        """The process is gone: stop the watchdog, clean nothing up, drop the loop."""
        coordinator: AsyncCoordinator = self._target
        coordinator.stop_without_cleanup()
        self._portal.run(asyncio.sleep(0))  # let the cancelled watchdog finish
