# Generated from participants/aio/marker_queue.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""The commit-marker queues read and trimmed over one STOMP connection (docs/design.md §3, §5).

Recovery reads which gtrids have a marker (a full browse) and removes the
markers of the transactions it has finished; the sweep removes the markers of
ended transactions. A coordinator's own queue holds its markers only, so the
sweep consumes it from the head to a sentinel of its own
(:func:`consume_own_markers`); the queue every coordinator shared before is
read by a browse and trimmed only at the positions the browse found
(:func:`consume_markers`). Written once, for asyncio; ``scripts/unasync.py``
generates the thread version, :mod:`participants.marker_queue`.
"""

from __future__ import annotations

import time
from collections.abc import Set as AbstractSet

from participants.activemq_base import marker_gtrids
from participants.stomp_client import SENTINEL_HEADER, Message, StompClient
from participants.stomp_core import sentinel_token

#: How long a sweep of the shared queue waits for a message before it browses again to
#: see whether what it is after is still there (another sweep may have taken it).
RECHECK_AFTER = 0.2

#: How many markers that stay (their transactions not ended) a sweep looks past; beyond
#: them the rest of the queue waits for the next sweep.
STAYING_WINDOW = 2000


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
    yet wanted). A browse names the messages to take: the wanted markers and
    the leftover browse sentinels (a younger sentinel may be a browse another
    coordinator is still running: see
    :data:`~participants.stomp_core.SENTINEL_LEFTOVER_AFTER`). A
    client-individual subscription whose prefetch holds the whole browse
    receives until it has seen each of them: the broker does not deliver in
    the browse's order (a message a closed consumer gave back is delivered
    after others), so a window cut at the last of them could fill with
    messages that stay. When nothing comes for :data:`RECHECK_AFTER`, a browse tells
    whether the rest is still on the queue; what another sweep took is not waited
    for. Only those named are ACKed; the UNSUBSCRIBE receipt
    proves the ACKs were processed, and the unacked messages go back to the
    queue. Markers beyond a browse the broker cut short stay for a later call.
    """

    def removable(message: Message) -> bool:
        named = marker_gtrids(message.headers)
        return bool(named) and set(named) <= wanted

    now = time.time()
    queued = client.browse(queue, idle_timeout=timeout)
    kept = {g for m in queued if not removable(m) for g in marker_gtrids(m.headers)}
    to_take = {m.message_id for m in queued if removable(m) or m.is_leftover_sentinel(now)}
    gone: set[str] = set()
    if to_take:
        subscription = client.subscribe(
            queue, ack="client-individual", prefetch=len(queued), timeout=timeout
        )
        quiet_until = time.monotonic() + timeout  # the wait for the next message ends here
        while to_take:
            left = quiet_until - time.monotonic()
            message = subscription.get(max(0.0, min(RECHECK_AFTER, left)))
            if message is None:
                if left <= RECHECK_AFTER:
                    break
                # Nothing came: another sweep may have taken the rest (two coordinators
                # starting together both take the left-over sentinels). Wait on only for
                # what is still on the queue.
                to_take &= {m.message_id for m in client.browse(queue, idle_timeout=timeout)}
                continue
            quiet_until = time.monotonic() + timeout
            to_take.discard(message.message_id)
            if removable(message):
                client.ack(message)
                gone.update(marker_gtrids(message.headers))
            elif message.is_leftover_sentinel(now):
                client.ack(message)
        subscription.unsubscribe(timeout=timeout)
    return gone, (set(wanted) & kept) - gone


def consume_own_markers(
    client: StompClient, queue: str, wanted: AbstractSet[str], timeout: float
) -> tuple[set[str], set[str]]:
    """Consume the markers on this coordinator's own ``queue`` whose every gtrid is in
    ``wanted``; leave the others. Returns what :func:`consume_markers` returns.

    No browse: a sentinel of this call's own is stored at the tail, and a
    client-individual subscription receives the queue in order up to it. Only
    wanted markers and sentinels are ACKed; the UNSUBSCRIBE receipt proves the
    ACKs were processed, and the unacked markers go back to the queue. The
    queue is this coordinator's alone, so no other sweep takes the sentinel
    away; a sweep that stops early (more than :data:`STAYING_WINDOW` markers
    staying ahead of it) leaves the rest for a later call.
    """
    token = sentinel_token()
    client.send(queue, "", {SENTINEL_HEADER: token}, receipt_timeout=timeout)
    subscription = client.subscribe(
        queue,
        ack="client-individual",
        prefetch=len(wanted) + STAYING_WINDOW,
        timeout=timeout,
    )
    gone: set[str] = set()
    kept: set[str] = set()
    while True:
        message = subscription.get(timeout)
        if message is None:
            break  # the window is full of markers that stay: the rest waits
        if message.is_sentinel:
            client.ack(message)
            if message.headers.get(SENTINEL_HEADER) == token:
                break
            continue
        named = marker_gtrids(message.headers)
        if named and all(g in wanted for g in named):
            client.ack(message)
            gone.update(named)
        else:
            kept.update(named)
    subscription.unsubscribe(timeout=timeout)
    return gone, (set(wanted) & kept) - gone
