# Generated from participants/aio/marker_queue.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""The commit-marker queue read and trimmed over one STOMP connection (docs/design.md §5).

Recovery reads which gtrids have a marker (a full browse) and removes the
markers of the transactions it has finished. Written once, for asyncio;
``scripts/unasync.py`` generates the thread version, :mod:`participants.marker_queue`.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from participants.activemq_base import marker_gtrids
from participants.stomp_client import Message, StompClient


def read_markers(client: StompClient, queue: str, timeout: float) -> set[str]:
    """The gtrids whose commit marker is on ``queue`` (a full browse, no selector).

    BrowseIncomplete if the broker cut the browse short (its maxBrowsePageSize):
    an incomplete list would make recovery roll back committed transactions.
    """
    found = client.browse_complete(queue, idle_timeout=timeout, receipt_timeout=timeout)
    return {gtrid for message in found for gtrid in marker_gtrids(message.headers)}


def consume_markers(
    client: StompClient, queue: str, wanted: AbstractSet[str], timeout: float
) -> tuple[set[str], set[str]]:
    """Consume the markers on ``queue`` whose every gtrid is in ``wanted``; leave the others.

    Returns the gtrids whose markers went, and the gtrids of ``wanted`` still
    named by a marker that stays (a group commit's marker naming a gtrid not
    yet wanted). A browse says where the wanted markers sit; a
    client-individual subscription with a prefetch reaching the last of them
    receives them in queue order; only wanted ones (and browse sentinels) are
    ACKed; the UNSUBSCRIBE receipt proves the ACKs were processed, and the
    unacked markers go back to the queue. Markers beyond a browse the broker
    cut short stay for a later call.
    """

    def removable(message: Message) -> bool:
        named = marker_gtrids(message.headers)
        return bool(named) and set(named) <= wanted

    queued = client.browse(queue, idle_timeout=timeout)
    kept = {g for m in queued if not removable(m) for g in marker_gtrids(m.headers)}
    positions = [i for i, m in enumerate(queued) if removable(m)]
    gone: set[str] = set()
    if positions:
        subscription = client.subscribe(
            queue, ack="client-individual", prefetch=positions[-1] + 1, timeout=timeout
        )
        removed = 0
        while removed < len(positions):
            message = subscription.get(timeout)
            if message is None:
                break  # someone else consumed the rest meanwhile
            if removable(message):
                client.ack(message)
                gone.update(marker_gtrids(message.headers))
                removed += 1
            elif message.is_sentinel:
                client.ack(message)
        subscription.unsubscribe(timeout=timeout)
    return gone, (set(wanted) & kept) - gone
