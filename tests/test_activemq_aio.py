"""The asyncio ActiveMQ last resource against the real broker: what it has as the sync one.

participants/activemq.py is generated from participants/aio/activemq.py; these
tests check on the lab that the asyncio source itself commits in groups,
subscribes, browses, sweeps markers and fences.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.errors import DuplicateGtrid
from participants.activemq import MAX_POOL_SIZE, client_id_for
from participants.aio.activemq import AsyncActiveMQ, FenceRefused
from participants.aio.stomp import AsyncStompClient
from tests.broker_queues import fresh_queue
from tests.conftest import open_stomp_client, stomp_login
from tests.test_activemq import (
    browse,
    fill_markers,
    frame_commands,
    start_holder,
    stop_child,
    unique,
)

pytestmark = pytest.mark.lab


def resource(stomp_addr: str, pool_size: int = 2) -> AsyncActiveMQ:
    return AsyncActiveMQ(
        stomp_addr,
        unique("t"),
        pool_size=pool_size,
        receipt_timeout=5.0,
        marker_queue=fresh_queue("markers"),
        **stomp_login(),
    )


async def commit_one(mq: AsyncActiveMQ, destination: str, body: str = "hello") -> str:
    gtrid = unique("t.")
    session = await mq.begin(gtrid)
    try:
        await session.send(destination, body, {"transfer-id": gtrid})
        await session.commit_with_marker(gtrid, timeout=5.0)
    finally:
        await session.release()
    return gtrid


def test_asyncio_sessions_committing_together_share_one_broker_transaction(
    stomp_addr: str,
) -> None:
    """Tasks reaching the commit point together share a COMMIT; each message and marker lands."""
    queue = fresh_queue()

    async def main() -> tuple[set[str], Any, set[str]]:
        mq = resource(stomp_addr, pool_size=8)
        try:

            async def work() -> list[str]:
                return [await commit_one(mq, queue) for _ in range(15)]

            batches = await asyncio.gather(*(work() for _ in range(8)))
            return {g for batch in batches for g in batch}, mq, await mq.markers()
        finally:
            await mq.close()

    gtrids, mq, markers = asyncio.run(main())
    assert mq.group_commit.items == 120
    assert mq.group_commit.batches < mq.group_commit.items  # some carried several
    assert markers == gtrids
    shared = [m for m in browse(stomp_addr, mq.marker_queue) if "," in m.headers.get("gtrid", "")]
    assert shared, "no marker names more than one gtrid"
    assert {m.headers["transfer-id"] for m in browse(stomp_addr, queue)} == gtrids


def record_writes(client: Any, writes: list[bytes]) -> Any:
    """Make ``client`` append every write to its socket to ``writes``; returns the original
    write, to put back."""
    write = client._write

    async def recorded(data: bytes, *args: Any) -> None:
        writes.append(data)
        await write(data, *args)

    client._write = recorded
    return write


def test_asyncio_transaction_leaves_in_one_write_with_its_commit(stomp_addr: str) -> None:
    """BEGIN, the SENDs, the marker and the COMMIT of an asyncio session go out in one write."""
    queue = fresh_queue()
    writes: list[bytes] = []

    async def main() -> tuple[str, set[str]]:
        mq = resource(stomp_addr)
        gtrid = unique("t.")
        session = await mq.begin(gtrid)
        client: Any = session._client
        write = record_writes(client, writes)
        try:
            await session.send(queue, "one")
            await session.send(queue, "two")
            await session.commit_with_marker(gtrid, timeout=5.0)
        finally:
            client._write = write
            await session.release()
        try:
            return gtrid, await mq.markers()
        finally:
            await mq.close()

    gtrid, markers = asyncio.run(main())
    assert len(writes) == 1
    assert frame_commands(writes[0]) == [
        b"BEGIN",
        b"SEND",
        b"SEND",
        b"SEND",
        b"COMMIT",
    ]
    assert len(browse(stomp_addr, queue)) == 2 and gtrid in markers


def test_asyncio_session_alone_sends_its_messages_ahead_of_the_commit_point(
    stomp_addr: str,
) -> None:
    """With no other session lent, an asyncio session's send_ahead writes BEGIN and the
    messages at once (not delivered yet); the commit point writes only the marker and
    the COMMIT."""
    queue = fresh_queue()
    writes: list[bytes] = []

    async def main() -> tuple[str, set[str], list[bytes], list[Any]]:
        mq = resource(stomp_addr)
        gtrid = unique("t.")
        try:
            session = await mq.begin(gtrid)
            client: Any = session._client
            write = record_writes(client, writes)
            try:
                await session.send(queue, "one")
                await session.send(queue, "two")
                await session.send_ahead()
                ahead = list(writes)
                seen = await asyncio.to_thread(browse, stomp_addr, queue)
                await session.commit_with_marker(gtrid, timeout=5.0)
            finally:
                client._write = write
                await session.release()
            return gtrid, await mq.markers(), ahead, seen
        finally:
            await mq.close()

    gtrid, markers, ahead, seen = asyncio.run(main())
    assert [frame_commands(w) for w in ahead] == [[b"BEGIN", b"SEND", b"SEND"]] and seen == []
    assert frame_commands(writes[1]) == [b"SEND", b"COMMIT"] and len(writes) == 2
    assert [m.body for m in browse(stomp_addr, queue)] == ["one", "two"] and gtrid in markers


def test_asyncio_messages_sent_ahead_are_dropped_when_the_transaction_aborts(
    stomp_addr: str,
) -> None:
    """An asyncio transaction that sent its messages ahead and then aborts: the broker
    delivers none of them and holds no marker."""
    queue = fresh_queue()

    async def main() -> tuple[str, set[str]]:
        mq = resource(stomp_addr)
        gtrid = unique("t.")
        try:
            session = await mq.begin(gtrid)
            try:
                await session.send(queue, "never")
                await session.send_ahead()
                await session.abort()
            finally:
                await session.release()
            return gtrid, await mq.markers()
        finally:
            await mq.close()

    gtrid, markers = asyncio.run(main())
    assert browse(stomp_addr, queue) == [] and gtrid not in markers


def test_asyncio_subscriber_consumes_inside_its_transactions(stomp_addr: str) -> None:
    """An asyncio broker of one session subscribes; an ACK commits with the transaction's
    SEND, and an aborted transaction's message comes back once the connection closes."""
    source, sink = fresh_queue("in"), fresh_queue("out")
    with open_stomp_client(stomp_addr) as client:
        for body in ("first", "second"):
            client.send(source, body, receipt_timeout=5.0)

    async def main() -> list[str]:
        mq = resource(stomp_addr, pool_size=1)
        try:
            subscription = await mq.subscribe(source, prefetch=1)
            seen = []
            for commit in (True, False):
                message = await subscription.get(5.0)
                assert message is not None
                seen.append(message.body)
                gtrid = unique("t.")
                session = await mq.begin(gtrid)
                try:
                    await session.ack(message.ack_id)
                    await session.send(sink, message.body.upper())
                    if commit:
                        await session.commit_with_marker(gtrid, timeout=5.0)
                    else:
                        await session.abort()
                finally:
                    await session.release()
            return seen
        finally:
            await mq.close()

    assert asyncio.run(main()) == ["first", "second"]
    assert [m.body for m in browse(stomp_addr, sink)] == ["FIRST"]
    assert [m.body for m in browse(stomp_addr, source)] == ["second"]


def test_asyncio_browse_complete_sees_past_the_broker_page(stomp_addr: str) -> None:
    """The asyncio client's complete browse finds a marker behind 1,200 others."""
    queue = fresh_queue("markers")
    fillers = [f"f.{i}" for i in range(1200)]
    fill_markers(stomp_addr, queue, fillers)

    async def main() -> list[str]:
        async with await AsyncStompClient.open(stomp_addr, **stomp_login()) as client:
            found = await client.browse_complete(queue, idle_timeout=5.0)
        return [m.headers["gtrid"] for m in found]

    assert asyncio.run(main()) == fillers


def test_asyncio_markers_and_a_shared_marker_go_only_when_every_gtrid_ended(
    stomp_addr: str,
) -> None:
    """The asyncio broker reads and sweeps the marker queue; a group's marker stays until
    all its gtrids were asked for, and none of them is reusable meanwhile."""

    async def main() -> None:
        mq = resource(stomp_addr)
        try:
            fill_markers(stomp_addr, mq.marker_queue, ["g.1,g.2", "g.3"])
            assert await mq.markers() == {"g.1", "g.2", "g.3"}
            assert await mq.remove_markers(["g.1", "g.3"]) == 1
            assert await mq.markers() == {"g.1", "g.2"}
            with pytest.raises(DuplicateGtrid, match=r"g\.1 is still named"):
                await mq.begin("g.1")
            assert await mq.remove_markers(["g.2"]) == 2
            assert await mq.markers() == set()
            await (await mq.begin("g.1")).release()
        finally:
            await mq.close()

    asyncio.run(main())


def test_asyncio_fence_covers_client_ids_beyond_its_own_pool(stomp_addr: str) -> None:
    """The asyncio fence() takes over every client-id a pool of its coordinator may have."""

    async def main() -> None:
        mq = resource(stomp_addr)
        try:
            client_id = client_id_for(mq.coordinator_id, MAX_POOL_SIZE - 1)
            child = start_holder(stomp_addr, client_id)
            try:
                with pytest.raises(FenceRefused, match=client_id):
                    await mq.fence(timeout=1.0)
            finally:
                stop_child(child)
            await mq.fence(timeout=10.0)
            await commit_one(mq, fresh_queue())  # the fenced pool still works
        finally:
            await mq.close()

    asyncio.run(main())
