"""twopc for asyncio: :class:`AsyncCoordinator` and :class:`AsyncTransaction`.

The same protocol, decision log and recovery as the sync API; the commit
sequence is written once (:mod:`coordinator.aio.driver`) and the sync one is
generated from it.
"""

from coordinator.aio.coordinator import AsyncCoordinator
from coordinator.aio.transaction import AsyncTransaction

__all__ = ["AsyncCoordinator", "AsyncTransaction"]
