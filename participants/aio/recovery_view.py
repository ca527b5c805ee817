"""An AsyncActiveMQ as recovery and the backlog see it: a synchronous LastResource.

Recovery and the backlog run in a worker thread while the event loop runs;
each call runs the broker's own coroutine on that loop and waits for it. The
thread version, :mod:`participants.recovery_view`, hands back the broker itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Coroutine
from typing import Any, Protocol, TypeVar

from coordinator.errors import InvalidTransition
from coordinator.protocol import AsyncLastResourceSession, LastResource, LastResourceSession

T = TypeVar("T")


class AsyncRecoverableBroker(Protocol):
    """What recovery calls on an asyncio broker (AsyncActiveMQ is one)."""

    @property
    def name(self) -> str: ...

    async def fence(self, timeout: float) -> None: ...

    async def settle(self, session: AsyncLastResourceSession, timeout: float) -> None: ...

    async def markers(self) -> set[str]: ...

    async def remove_markers(self, gtrids: Collection[str]) -> int: ...


def recovery_view(broker: AsyncRecoverableBroker) -> LastResource:
    """``broker`` for recovery's worker thread, its calls run on the running loop."""
    return _RecoveryBroker(broker, asyncio.get_running_loop())


class _RecoveryBroker:
    """Runs each call of recovery's worker thread on the broker's event loop."""

    def __init__(self, broker: AsyncRecoverableBroker, loop: asyncio.AbstractEventLoop) -> None:
        self._broker = broker
        self._loop = loop

    @property
    def name(self) -> str:
        return self._broker.name

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def begin(self, gtrid: str) -> LastResourceSession:
        raise InvalidTransition(
            f"cannot begin {gtrid} on recovery's view of broker {self.name!r}: "
            "transactions begin on the AsyncActiveMQ"
        )

    def fence(self, timeout: float) -> None:
        self._on_loop(self._broker.fence(timeout))

    def settle(self, session: object, timeout: float) -> None:
        if not isinstance(session, AsyncLastResourceSession):
            raise InvalidTransition(f"{session!r} is not a session of broker {self.name!r}")
        self._on_loop(self._broker.settle(session, timeout))

    def markers(self) -> set[str]:
        return self._on_loop(self._broker.markers())

    def remove_markers(self, gtrids: Collection[str]) -> int:
        return self._on_loop(self._broker.remove_markers(gtrids))

    def close(self) -> None:
        """Nothing of its own to close: the AsyncActiveMQ closes its connections."""
