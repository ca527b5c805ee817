"""An ActiveMQ as recovery and the backlog see it: itself (a LastResource already).

The asyncio twin, :mod:`participants.aio.recovery_view`, runs the calls of
recovery's worker thread on the event loop; with threads there is nothing to do.
"""

from __future__ import annotations

from coordinator.protocol import LastResource


def recovery_view(broker: LastResource) -> LastResource:
    """``broker`` itself: recovery calls it from any thread."""
    return broker
