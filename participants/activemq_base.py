"""What the sync and asyncio ActiveMQ resources share: the marker format, the pool's
client-ids, the session states and the errors (docs/design.md §5).

The resources themselves are written once, for asyncio
(:mod:`participants.aio.activemq`), and :mod:`participants.activemq` is
generated from it; what must be one object for both (an exception a caller
catches, a constant recovery reads) lives here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from coordinator.errors import CommitRefused, ParticipantError, ParticipantUnavailable

#: Each coordinator's commit markers go to a queue of its own, ``<prefix><coordinator id>``
#: (:func:`marker_queue_for`): its sweep consumes the queue instead of browsing every
#: coordinator's markers, and no one else's sweep touches its browse sentinels.
MARKER_QUEUE_PREFIX = "/queue/twopc.markers."

#: Where every coordinator's markers went before each had a queue of its own. Never written
#: now; recovery still reads a coordinator's markers there and removes them once it has
#: acted on them, so that markers left by an earlier version are not lost (docs/design.md §3).
SHARED_MARKER_QUEUE = "/queue/twopc.markers"

#: The marker's header naming the gtrids it commits (several for a group commit).
MARKER_HEADER = "gtrid"
MARKER_SEPARATOR = ","

#: The largest pool. fence() takes over this many client-ids whatever its own
#: pool size, so that recovery with a small pool still fences every session a
#: crashed coordinator with a large pool may have had.
MAX_POOL_SIZE = 64


def marker_gtrids(headers: Mapping[str, str]) -> list[str]:
    """The gtrids a commit marker's headers name (a group commit names several)."""
    value = headers.get(MARKER_HEADER, "")
    return [gtrid for gtrid in value.split(MARKER_SEPARATOR) if gtrid]


def marker_queue_for(coordinator_id: str) -> str:
    """The queue of ``coordinator_id``'s commit markers."""
    return MARKER_QUEUE_PREFIX + coordinator_id


def client_id_for(coordinator_id: str, slot: int) -> str:
    """The fixed client-id of pool slot ``slot`` of ``coordinator_id``."""
    return f"twopc-{coordinator_id}-{slot}"


class SessionState(enum.Enum):
    """Where a broker session's transaction stands."""

    ACTIVE = "active"
    COMMITTING = "committing"  # COMMIT about to be sent or sent, no answer yet
    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_DOUBT = "in doubt"
    RELEASED = "released"


class CommitNotSent(CommitRefused, ParticipantUnavailable):
    """The connection was lost before the COMMIT frame was written: nothing was committed."""


class FenceRefused(ParticipantError):
    """A live connection (a running or paused coordinator) still holds one of our client-ids."""

    def __init__(self, client_id: str, timeout: float, *, participant: str) -> None:
        super().__init__(
            f"client-id {client_id} is still held by a live connection after {timeout:g} s: "
            "a live coordinator (maybe paused) still holds it. Stop that coordinator (or let "
            "it finish) and run 'twopc recover' again",
            participant=participant,
        )
        self.client_id = client_id
