"""An ActiveMQ as recovery and the backlog see it: itself (a LastResource already).

The asyncio twin, :mod:`participants.aio.recovery_view`, runs the calls of
recovery's worker thread on the event loop; with threads there is nothing to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coordinator.protocol import LastResource

if TYPE_CHECKING:
    from participants.activemq import ActiveMQ


def recovery_view(broker: ActiveMQ) -> LastResource:
    """``broker`` itself: recovery calls it from any thread."""
    return broker
