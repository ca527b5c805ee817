"""The ActiveMQ last resource and its STOMP client, against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from coordinator import failpoints
from coordinator.errors import (
    CommitRefused,
    CrashInjected,
    DuplicateGtrid,
    InvalidTransition,
    OutcomeUnknown,
    ParticipantError,
    ParticipantUnavailable,
    TwoPhaseCommitError,
)
from coordinator.protocol import LastResource, LastResourceSession
from coordinator.xid import Xid
from participants import stomp_core
from participants.activemq import (
    MAX_POOL_SIZE,
    SHARED_MARKER_QUEUE,
    ActiveMQ,
    CommitNotSent,
    FenceRefused,
    client_id_for,
    marker_queue_for,
)
from participants.aio.activemq import AsyncActiveMQ
from participants.aio.marker_queue import consume_markers as aconsume_markers
from participants.aio.stomp import AsyncStompClient
from participants.aio.stomp_ops import AsyncStompOperations
from participants.marker_queue import consume_markers
from participants.postgres import PostgresResource
from participants.stomp_client import SENTINEL_HEADER, ClientIdInUse
from participants.stomp_core import BrowseIncomplete
from participants.stomp_headers import InvalidMessage
from participants.stomp_ops import StompOperations
from scenarios.config import Settings
from scenarios.transfer.invariants import every_message
from scenarios.transfer.model import drain
from scenarios.wiring import open_coordinator, open_stomp
from tests.aio_portal import Blocking
from tests.broker_queues import fresh_queue, named_queues
from tests.conftest import open_stomp_client, stomp_login

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[1]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def browse(stomp_addr: str, destination: str) -> list[Any]:
    with open_stomp_client(stomp_addr) as client:
        return client.browse(destination)


@pytest.fixture
def queue_name() -> str:
    """A queue no other test uses."""
    return fresh_queue()


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    failpoints.disarm()


@pytest.fixture
def mq(stomp_addr: str) -> Iterator[ActiveMQ]:
    """An ActiveMQ resource with its own coordinator id and marker queue."""
    resource = ActiveMQ(
        stomp_addr,
        unique("t"),
        pool_size=2,
        receipt_timeout=5.0,
        marker_queue=fresh_queue("markers"),
        **stomp_login(),
    )
    yield resource
    resource.close()


def commit_one(mq: ActiveMQ, destination: str, body: str = "hello") -> str:
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    try:
        session.send(destination, body, {"transfer-id": gtrid})
        session.commit_with_marker(gtrid, timeout=5.0)
    finally:
        session.release()
    return gtrid


def fill_markers(stomp_addr: str, marker_queue: str, gtrids: list[str]) -> None:
    """Put one marker per gtrid on the marker queue, in one transaction."""
    with open_stomp_client(stomp_addr) as client:
        client.begin("fill")
        for gtrid in gtrids:
            client.send(marker_queue, "", {"gtrid": gtrid}, transaction="fill")
        client.commit("fill", timeout=30.0)


def test_commit_with_marker_makes_message_and_marker_visible(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """commit_with_marker makes the message and its marker browsable, the message consumable."""
    assert isinstance(mq, LastResource)
    gtrid = commit_one(mq, queue_name, "débit 10")
    [message] = browse(stomp_addr, queue_name)
    assert message.body == "débit 10"
    assert message.headers["transfer-id"] == gtrid
    assert message.headers["persistent"] == "true"
    assert mq.markers() == {gtrid}
    with open_stomp_client(stomp_addr) as client:
        subscription = client.subscribe(queue_name)
        consumed = subscription.get(timeout=5.0)
    assert consumed is not None
    assert consumed.body == "débit 10"
    assert browse(stomp_addr, queue_name) == []


def test_abort_leaves_nothing(mq: ActiveMQ, stomp_addr: str, queue_name: str) -> None:
    """An aborted transaction leaves no message and no marker."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    session.send(queue_name, "never")
    assert session.has_work
    session.abort()
    session.release()
    assert browse(stomp_addr, queue_name) == []
    assert gtrid not in mq.markers()


def test_session_without_sends_has_no_work(mq: ActiveMQ, stomp_addr: str) -> None:
    """A session that sent nothing has no work; its one-phase commit sends nothing."""
    session = mq.begin(unique("t."))
    assert not session.has_work
    session.commit(timeout=5.0)
    with pytest.raises(InvalidTransition, match="committed"):
        session.send("/queue/test.late", "too late")
    session.release()
    assert mq.markers() == set()


def test_error_frame_on_commit_is_commit_refused(mq: ActiveMQ, queue_name: str) -> None:
    """An ERROR frame answering the COMMIT (transaction unknown to the broker) is CommitRefused."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    session.send(queue_name, "x")
    # Begin the transaction on the session's own connection, then end it behind
    # the session's back: the COMMIT then names a transaction the broker does not
    # know, and it answers with an ERROR frame.
    session._go_solo()
    session._client.abort(gtrid, timeout=5.0)
    with pytest.raises(CommitRefused, match="Invalid transaction id") as raised:
        session.commit_with_marker(gtrid, timeout=5.0)
    assert raised.value.gtrid == gtrid
    assert raised.value.participant == "mq"
    session.release()
    assert gtrid not in mq.markers()


def test_no_receipt_in_time_is_outcome_unknown(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """No RECEIPT in time is OutcomeUnknown; after fencing, the marker says it committed."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    session.send(queue_name, "maybe")
    # The broker's RECEIPT is lost on the way: the receiver never wakes the waiter (a
    # timeout of 0 s alone races a receiver that is quick to read the answer).
    session._client._answered = lambda waiter, error: None
    with pytest.raises(OutcomeUnknown, match="twopc recover") as raised:
        session.commit_with_marker(gtrid, timeout=0.5)
    assert raised.value.gtrid == gtrid
    session.release()
    mq.fence(timeout=10.0)
    assert gtrid in mq.markers()
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["maybe"]


@pytest.mark.parametrize(
    ("failpoint", "committed"), [("before_broker_commit", False), ("after_broker_commit", True)]
)
def test_crash_around_the_broker_commit(
    mq: ActiveMQ, stomp_addr: str, queue_name: str, failpoint: str, committed: bool
) -> None:
    """A crash before the COMMIT frame commits nothing; one after it commits (the marker tells)."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    session.send(queue_name, "crash")
    failpoints.arm(failpoint)
    with pytest.raises(CrashInjected):
        session.commit_with_marker(  # the driver's failpoints, as the driver passes them
            gtrid,
            timeout=5.0,
            before_commit=partial(failpoints.hit, "before_broker_commit"),
            commit_sent=partial(failpoints.hit, "after_broker_commit"),
        )
    session.release()  # drops the connection, as the crash would have
    mq.fence(timeout=10.0)
    assert (gtrid in mq.markers()) is committed
    assert len(browse(stomp_addr, queue_name)) == int(committed)


def test_refused_send_aborts_instead_of_committing_the_rest(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """An ERROR for a SEND inside the transaction makes the commit CommitRefused, not partial."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    assert isinstance(session, LastResourceSession)
    session.send(queue_name, "kept only if all is kept")
    # A SEND the broker answers with an ERROR while keeping the connection (and the
    # transaction) open; send() refuses such destinations, so write the frame raw,
    # once the transaction is begun on the session's connection.
    session._go_solo()
    headers = {"destination": "/remote-temp-queue/ID:gone", "transaction": gtrid}
    session._client.request("SEND", headers, "x", what="SEND")
    time.sleep(0.5)  # let the ERROR arrive before the commit
    with pytest.raises(CommitRefused, match="refused a frame"):
        session.commit_with_marker(gtrid, timeout=5.0)
    session.release()
    assert browse(stomp_addr, queue_name) == []
    assert gtrid not in mq.markers()


def test_concurrent_transactions_share_the_pool(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """Eight threads committing through a pool of two sessions: every message and marker lands."""

    def work(_: int) -> list[str]:
        return [commit_one(mq, queue_name) for _ in range(10)]

    with ThreadPoolExecutor(8) as pool:
        gtrids = {g for batch in pool.map(work, range(8)) for g in batch}
    assert len(gtrids) == 80
    assert mq.markers() == gtrids
    assert {m.headers["transfer-id"] for m in browse(stomp_addr, queue_name)} == gtrids


def test_sessions_committing_together_share_one_broker_transaction(
    stomp_addr: str, queue_name: str
) -> None:
    """Sessions reaching the commit point together share a COMMIT; each message and marker lands."""
    resource = ActiveMQ(
        stomp_addr,
        unique("t"),
        pool_size=8,
        marker_queue=fresh_queue("markers"),
        **stomp_login(),
    )
    try:

        def work(_: int) -> list[str]:
            return [commit_one(resource, queue_name) for _ in range(15)]

        with ThreadPoolExecutor(8) as pool:
            gtrids = {g for batch in pool.map(work, range(8)) for g in batch}
        group = resource.group_commit
        assert group.items == 120
        assert group.batches < group.items  # some commits carried several transactions
        assert resource.markers() == gtrids
        shared = [
            m
            for m in browse(stomp_addr, resource.marker_queue)
            if "," in m.headers.get("gtrid", "")
        ]
        assert shared, "no marker names more than one gtrid"
        assert {m.headers["transfer-id"] for m in browse(stomp_addr, queue_name)} == gtrids
    finally:
        resource.close()


def test_a_shared_marker_goes_only_when_every_gtrid_it_names_ended(
    mq: ActiveMQ, stomp_addr: str
) -> None:
    """A group's marker stays until all its gtrids were asked for; none is reusable meanwhile."""
    with open_stomp_client(stomp_addr) as client:
        client.begin("fill")
        client.send(mq.marker_queue, "", {"gtrid": "g.1,g.2"}, transaction="fill")
        client.send(mq.marker_queue, "", {"gtrid": "g.3"}, transaction="fill")
        client.commit("fill", timeout=5.0)
    assert mq.markers() == {"g.1", "g.2", "g.3"}
    assert mq.remove_markers(["g.1", "g.3"]) == 1
    assert mq.markers() == {"g.1", "g.2"}
    with pytest.raises(DuplicateGtrid, match=r"g\.1 is still named"):
        mq.begin("g.1")
    assert mq.remove_markers(["g.2"]) == 2  # g.1 was asked before: the marker goes now
    assert mq.markers() == set()
    mq.begin("g.1").release()


def frame_commands(write: bytes) -> list[bytes]:
    """The commands of the STOMP frames in one write."""
    frames = [frame.lstrip(b"\n") for frame in write.split(b"\x00") if frame.strip()]
    return [frame.split(b"\n", 1)[0] for frame in frames]


@contextlib.contextmanager
def recorded_writes(client: Any) -> Iterator[list[bytes]]:
    """Every write ``client`` makes to its socket inside the block, in order."""
    writes: list[bytes] = []
    write = client._write
    client._write = lambda data: (writes.append(data), write(data))[1]
    try:
        yield writes
    finally:
        client._write = write


def test_a_transaction_leaves_in_one_write_with_its_commit(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """BEGIN, the SENDs, the marker and the COMMIT of a session go to the socket in one write."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    with recorded_writes(session._client) as writes:
        try:
            session.send(queue_name, "one")
            session.send(queue_name, "two")
            session.commit_with_marker(gtrid, timeout=5.0)
        finally:
            session.release()
    assert len(writes) == 1
    assert frame_commands(writes[0]) == [
        b"BEGIN",
        b"SEND",
        b"SEND",
        b"SEND",
        b"COMMIT",
    ]
    assert len(browse(stomp_addr, queue_name)) == 2 and gtrid in mq.markers()


def test_a_session_alone_sends_its_messages_ahead_of_the_commit_point(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """With no other session lent, send_ahead writes BEGIN and the messages at once (not
    delivered yet); the commit point then writes only the marker and the COMMIT."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    with recorded_writes(session._client) as writes:
        try:
            session.send(queue_name, "one")
            session.send(queue_name, "two")
            session.send_ahead()
            assert [frame_commands(w) for w in writes] == [[b"BEGIN", b"SEND", b"SEND"]]
            assert browse(stomp_addr, queue_name) == []  # inside the open transaction
            session.commit_with_marker(gtrid, timeout=5.0)
        finally:
            session.release()
    assert frame_commands(writes[1]) == [b"SEND", b"COMMIT"] and len(writes) == 2
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["one", "two"]
    assert gtrid in mq.markers()


def test_a_session_sends_nothing_ahead_while_another_is_lent(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """With a second session lent, send_ahead writes nothing: the messages wait for the
    group commit, and BEGIN, the SENDs, the marker and the COMMIT leave in one write."""
    gtrid = unique("t.")
    other = mq.begin(unique("t."))
    session = mq.begin(gtrid)
    with recorded_writes(session._client) as writes:
        try:
            session.send(queue_name, "one")
            session.send_ahead()
            assert writes == []
            session.commit_with_marker(gtrid, timeout=5.0)
        finally:
            session.release()
            other.release()
    assert [frame_commands(w) for w in writes] == [[b"BEGIN", b"SEND", b"SEND", b"COMMIT"]]
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["one"]


def test_messages_sent_ahead_are_dropped_when_the_transaction_aborts(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """A transaction that sent its messages ahead and then aborts (a NO vote in phase 1):
    the broker delivers none of them and holds no marker."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    try:
        session.send(queue_name, "never")
        session.send_ahead()
        session.abort()
    finally:
        session.release()
    assert browse(stomp_addr, queue_name) == []
    assert gtrid not in mq.markers()
    assert commit_one(mq, queue_name, "later") in mq.markers()  # the connection is reused


def test_a_crash_before_the_commit_commits_nothing_and_waits_for_nothing(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """A failpoint firing before the COMMIT: its crash propagates at once, nothing commits."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    session.send(queue_name, "never")

    def crash() -> None:
        raise CrashInjected("failpoint before_broker_commit fired")

    started = time.monotonic()
    with pytest.raises(CrashInjected):
        session.commit_with_marker(gtrid, timeout=5.0, before_commit=crash)
    assert time.monotonic() - started < mq.receipt_timeout / 2
    session.release()
    assert browse(stomp_addr, queue_name) == [] and gtrid not in mq.markers()
    commit_one(mq, queue_name, "after")  # the pool still works
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["after"]


def test_frames_kept_in_a_cork_that_raises_never_reach_the_broker(
    stomp_addr: str, queue_name: str
) -> None:
    """A corked block that raises drops its frames: the broker never sees them."""
    with open_stomp_client(stomp_addr) as client:
        with pytest.raises(RuntimeError), client.corked():
            client.send(queue_name, "never")
            raise RuntimeError("stop before the write")
        client.send(queue_name, "sent", receipt_timeout=5.0)
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["sent"]


def test_client_commit_of_unknown_transaction_is_commit_refused(stomp_addr: str) -> None:
    """The client turns the ERROR answering a COMMIT into CommitRefused; the connection stays up."""
    with open_stomp_client(stomp_addr) as client:
        with pytest.raises(CommitRefused, match="Invalid transaction id"):
            client.commit("no-such-tx", timeout=5.0, gtrid="g.1")
        assert client.alive


def test_begin_with_broker_down_is_unavailable() -> None:
    """begin() where no broker listens raises ParticipantUnavailable with the address and advice."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mq = ActiveMQ(f"127.0.0.1:{port}", "down", connect_timeout=2.0)
    with pytest.raises(ParticipantUnavailable) as raised:
        mq.begin("down.1")
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message
    assert "twopc lab up" in message and "TWOPC_STOMP" in message
    mq.close()


@pytest.mark.slow
def test_broker_killed_between_send_and_commit(
    mq: ActiveMQ, stomp_addr: str, queue_name: str, broker_control: Any
) -> None:
    """A broker killed before the COMMIT: the commit fails; after restart nothing of it is left."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    session.send(queue_name, "lost")
    broker_control.kill()
    with pytest.raises((OutcomeUnknown, ParticipantUnavailable)) as raised:
        session.commit_with_marker(gtrid, timeout=2.0)
    assert raised.value.gtrid == gtrid
    session.release()
    broker_control.start()
    assert browse(stomp_addr, queue_name) == []
    assert gtrid not in mq.markers()
    # The pool drops the dead connection and reconnects.
    later = commit_one(mq, queue_name)
    assert mq.markers() == {later}


@pytest.mark.slow
def test_committed_message_survives_broker_kill(
    mq: ActiveMQ, stomp_addr: str, queue_name: str, broker_control: Any
) -> None:
    """A message whose COMMIT got its receipt survives kill -9 of the broker and a restart."""
    gtrid = commit_one(mq, queue_name, "durable")
    broker_control.kill()
    broker_control.start()
    # A plain browse right after a restart may end before the broker paged the stored
    # message in; the verified browse reads up to a sentinel stored behind it.
    with open_stomp_client(stomp_addr) as client:
        assert [m.body for m in client.browse_complete(queue_name)] == ["durable"]
    assert gtrid in mq.markers()


def start_holder(stomp_addr: str, client_id: str, code: str = "") -> subprocess.Popen[str]:
    """A child process that CONNECTs with ``client_id``, runs ``code``, prints 'ready', sleeps."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from participants.stomp_client import StompClient
        from scenarios.config import Settings
        client = StompClient.open(
            {stomp_addr!r}, client_id={client_id!r}, **Settings.load().stomp_options()
        )
        """
    )
    script += textwrap.dedent(code) + "\nprint('ready', flush=True)\ntime.sleep(600)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def stop_child(child: subprocess.Popen[str]) -> None:
    child.kill()
    child.wait()
    if child.stdout is not None:
        child.stdout.close()


@pytest.mark.slow
def test_fence_succeeds_after_holder_is_killed(
    mq: ActiveMQ, stomp_addr: str, queue_name: str
) -> None:
    """After SIGKILL of a process firing COMMITs unawaited, fence succeeds and markers agree."""
    client_id = client_id_for(mq.coordinator_id, 0)
    fire_commits = f"""
        for i in range(300):
            tx = f"dead.{{i}}"
            client.begin(tx)
            client.send({queue_name!r}, "m", {{"gtrid": tx}}, transaction=tx)
            client.send({mq.marker_queue!r}, "", {{"gtrid": tx}}, transaction=tx)
            client.request("COMMIT", {{"transaction": tx}}, what="COMMIT")
    """
    child = start_holder(stomp_addr, client_id, fire_commits)
    child.send_signal(signal.SIGKILL)
    stop_child(child)
    mq.fence(timeout=30.0)
    business = {m.headers["gtrid"] for m in browse(stomp_addr, queue_name)}
    assert mq.markers() == business
    commit_one(mq, queue_name)  # the fenced sessions are kept in the pool and work


def test_fence_covers_client_ids_beyond_its_own_pool(mq: ActiveMQ, stomp_addr: str) -> None:
    """fence() also takes over client-ids a larger pool of the same coordinator would use."""
    client_id = client_id_for(mq.coordinator_id, MAX_POOL_SIZE - 1)
    child = start_holder(stomp_addr, client_id)
    try:
        with pytest.raises(FenceRefused, match=client_id):
            mq.fence(timeout=1.0)
    finally:
        stop_child(child)
    mq.fence(timeout=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("pause", [False, True], ids=["alive", "stopped"])
def test_fence_refuses_while_holder_lives(mq: ActiveMQ, stomp_addr: str, pause: bool) -> None:
    """A live (or SIGSTOPped) process holding a client-id makes fence raise after its timeout."""
    client_id = client_id_for(mq.coordinator_id, 1)
    child = start_holder(stomp_addr, client_id)
    try:
        if pause:
            child.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with (
            capture_logs() as logs,
            pytest.raises(FenceRefused, match=f"{client_id} is still held") as raised,
        ):
            mq.fence(timeout=2.0)
        assert time.monotonic() - started >= 2.0
        assert "twopc recover" in str(raised.value)
        assert raised.value.client_id == client_id
        [refused] = [e for e in logs if e["event"] == "mq.fence.refused"]
        assert refused["client_id"] == client_id
    finally:
        stop_child(child)


def test_second_connection_with_same_client_id_is_refused(stomp_addr: str) -> None:
    """The broker refuses a second live connection with a client-id: ClientIdInUse."""
    client_id = unique("test-")
    with (
        open_stomp_client(stomp_addr, client_id=client_id),
        pytest.raises(ClientIdInUse, match=client_id),
    ):
        open_stomp_client(stomp_addr, client_id=client_id)
    open_stomp_client(stomp_addr, client_id=client_id).close()  # free again once closed


def test_markers_finds_a_marker_deep_in_the_queue(mq: ActiveMQ, stomp_addr: str) -> None:
    """markers() browses the whole queue: a marker behind 1,200 others is found."""
    fillers = [f"f.{i}" for i in range(1200)]
    fill_markers(stomp_addr, mq.marker_queue, fillers)
    gtrid = commit_one(mq, fresh_queue())
    assert mq.markers() == {*fillers, gtrid}


@pytest.mark.slow
def test_remove_markers_removes_exactly_the_given_ones(mq: ActiveMQ, stomp_addr: str) -> None:
    """remove_markers() takes exactly the named ones of 2,000 markers; none is dead-lettered."""
    gtrids = [f"g.{i}" for i in range(2000)]
    fill_markers(stomp_addr, mq.marker_queue, gtrids)
    ended = set(gtrids[::3]) | {gtrids[-1]}
    assert mq.remove_markers(ended | {"never.there"}) == len(ended)
    assert mq.markers() == set(gtrids) - ended
    assert mq.remove_markers([]) == 0
    assert mq.remove_markers(["never.there"]) == 0
    assert mq.remove_markers(gtrids[1:3]) == 2
    assert mq.markers() == set(gtrids) - ended - set(gtrids[1:3])
    dead = {m.headers.get("gtrid") for m in browse(stomp_addr, "/queue/ActiveMQ.DLQ")}
    assert not dead & set(gtrids)


def test_browse_sentinels_are_left_out_and_cleaned_up(mq: ActiveMQ, stomp_addr: str) -> None:
    """markers() leaves a sentinel behind, never reports it; remove_markers() acks it on its way."""
    fill_markers(stomp_addr, mq.marker_queue, ["a.1", "a.2"])
    assert mq.markers() == {"a.1", "a.2"}
    assert mq.markers() == {"a.1", "a.2"}
    later = commit_one(mq, fresh_queue())
    assert sum(m.is_sentinel for m in browse(stomp_addr, mq.marker_queue)) == 2
    assert mq.remove_markers([later]) == 1
    assert [m.headers["gtrid"] for m in browse(stomp_addr, mq.marker_queue)] == ["a.1", "a.2"]


def test_socket_has_nodelay_and_commits_are_fast(mq: ActiveMQ, stomp_addr: str) -> None:
    """TCP_NODELAY is set; a COMMIT-with-receipt round trip takes milliseconds, not Nagle's 45."""
    with open_stomp_client(stomp_addr) as client:
        assert client.tcp_socket is not None
        assert client.tcp_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    destination = fresh_queue()
    durations = []
    for _ in range(50):
        gtrid = unique("t.")
        session = mq.begin(gtrid)
        session.send(destination, "x")
        started = time.perf_counter()
        session.commit_with_marker(gtrid, timeout=5.0)
        durations.append(time.perf_counter() - started)
        session.release()
    median_ms = statistics.median(durations) * 1000
    print(f"marker + COMMIT with receipt: median {median_ms:.2f} ms over 50 commits")
    assert median_ms < 40


# -- headers (participants/stomp_headers.py) -------------------------------------------

Send = tuple[str, Any, dict[str, Any]]


class Broker:
    """One broker resource of either API, driven from the test's thread."""

    def __init__(self, api: str, stomp_addr: str, pool_size: int = 2) -> None:
        self.api = api
        self.marker_queue = fresh_queue("markers")
        options: dict[str, Any] = {"pool_size": pool_size, "marker_queue": self.marker_queue}
        self.sync = ActiveMQ(stomp_addr, unique("t"), **options, **stomp_login())
        self._runner = asyncio.Runner()
        self._aio = AsyncActiveMQ(stomp_addr, unique("t"), **options, **stomp_login())

    def transaction(self, sends: list[Send], *, commit: bool = True) -> tuple[str, list[str]]:
        """Send ``sends`` in one transaction, then commit (with marker) or abort it;
        its gtrid and the header names each refused send named ("body" for a body)."""
        gtrid = unique("t.")
        if self.api == "sync":
            return gtrid, sync_transaction(self.sync, gtrid, sends, commit)
        return gtrid, self._runner.run(aio_transaction(self._aio, gtrid, sends, commit))

    def commit_on_a_lost_connection(self, destination: str, *, ahead: bool) -> Exception:
        """Send one message (ahead of the commit point, or kept for the group commit), lose
        the connection just before the COMMIT, and return what the commit raised."""
        resource = self.sync if self.api == "sync" else Blocking(self._runner, self._aio)
        return commit_on_a_lost_connection(resource, unique("t."), destination, ahead)

    def close(self) -> None:
        self._runner.run(self._aio.close())
        self._runner.close()
        self.sync.close()


def sync_transaction(mq: ActiveMQ, gtrid: str, sends: list[Send], commit: bool) -> list[str]:
    session = mq.begin(gtrid)
    refused = []
    try:
        for destination, body, headers in sends:
            try:
                session.send(destination, body, headers)
            except InvalidMessage as exc:
                assert exc.gtrid == gtrid and exc.participant == mq.name
                refused.append(str(getattr(exc, "header", "body")))
        if commit:
            session.commit_with_marker(gtrid, timeout=5.0)
        else:
            session.abort()
    finally:
        session.release()
    return refused


async def aio_transaction(
    mq: AsyncActiveMQ, gtrid: str, sends: list[Send], commit: bool
) -> list[str]:
    session = await mq.begin(gtrid)
    refused = []
    try:
        for destination, body, headers in sends:
            try:
                await session.send(destination, body, headers)
            except InvalidMessage as exc:
                assert exc.gtrid == gtrid and exc.participant == mq.name
                refused.append(str(getattr(exc, "header", "body")))
        if commit:
            await session.commit_with_marker(gtrid, timeout=5.0)
        else:
            await session.abort()
    finally:
        await session.release()
    return refused


def commit_on_a_lost_connection(mq: Any, gtrid: str, destination: str, ahead: bool) -> Exception:
    session = mq.begin(gtrid)
    try:
        session.send(destination, "never")
        if ahead:
            session.send_ahead()
        with pytest.raises(TwoPhaseCommitError) as raised:
            session.commit_with_marker(gtrid, timeout=5.0, before_commit=session._client.drop)
    finally:
        session.release()
    return raised.value


def settle_while_the_slot_is_lent(mq: Any, destination: str) -> str:
    """Leave a COMMIT in doubt (its RECEIPT lost), let another transaction borrow the pool's
    only slot (connecting it again), and settle the first while that one holds the slot.
    Returns the in-doubt gtrid."""
    gtrid = unique("t.")
    session = mq.begin(gtrid)
    session.send(destination, "maybe")
    session._client._answered = lambda waiter, error: None
    with pytest.raises(OutcomeUnknown):
        session.commit_with_marker(gtrid, timeout=0.5)
    session.release()
    borrower = mq.begin(unique("t."))
    try:
        mq.settle(getattr(session, "_target", session), 5.0)
    finally:
        borrower.release()
    return gtrid


@pytest.fixture(params=["sync", "asyncio"])
def broker(request: pytest.FixtureRequest, stomp_addr: str) -> Iterator[Broker]:
    """The broker resource of the sync and of the asyncio API, in turn."""
    resource = Broker(request.param, stomp_addr)
    yield resource
    resource.close()


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_a_settle_does_not_wait_for_a_slot_connected_again_since(
    stomp_addr: str, queue_name: str, api: str
) -> None:
    """An in-doubt COMMIT is settled while the next transaction holds its slot, which that
    transaction connected again (proof that the broker is done with the old connection):
    before, the settle waited for the slot and failed at its timeout, while that holder
    could itself be waiting for the in-doubt transaction's row locks."""
    resource = Broker(api, stomp_addr, pool_size=1)
    try:
        mq = resource.sync if api == "sync" else Blocking(resource._runner, resource._aio)
        gtrid = settle_while_the_slot_is_lent(mq, queue_name)
        assert gtrid in mq.markers()
    finally:
        resource.close()
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["maybe"]


def test_a_header_name_with_a_colon_round_trips(
    broker: Broker, stomp_addr: str, queue_name: str
) -> None:
    """Names with a colon or backslash and values with line breaks arrive exactly as sent."""
    headers = {"x:y": "v:1\\2", "a\\b": "line\nbreak\r", "type": "transfer.credit"}
    gtrid, refused = broker.transaction([(queue_name, "hello", headers)])
    assert refused == []
    with open_stomp_client(stomp_addr) as client:
        message = client.subscribe(queue_name).get(timeout=5.0)
    assert message is not None
    assert {name: message.headers.get(name) for name in headers} == headers
    assert message.headers["gtrid"] == gtrid
    assert broker.sync.markers() == {gtrid}


@pytest.mark.parametrize(
    "bad",
    [
        {"x\ndestination": "/queue/other"},
        {"expires": "1"},
        {"priority": "abc"},
        {"JMSXGroupSeq": "abc"},
        {"k": "nul\x00"},
        {"k": 7},
    ],
    ids=["injected-destination", "expires", "priority", "jms-name", "nul", "not-str"],
)
def test_a_bad_header_fails_only_its_own_send(
    broker: Broker, stomp_addr: str, queue_name: str, bad: dict[str, Any]
) -> None:
    """A refused header fails its send at once; the transaction's other messages commit."""
    other = fresh_queue("other")
    sends = [(queue_name, "first", {}), (queue_name, "bad", bad), (queue_name, "second", {})]
    with capture_logs() as logs:
        gtrid, refused = broker.transaction(sends)
    assert refused == list(bad)
    [event] = [e for e in logs if e["event"] == "mq.send.refused"]
    assert event["gtrid"] == gtrid and event["log_level"] == "warning"
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["first", "second"]
    assert browse(stomp_addr, other) == []
    assert broker.sync.markers() == {gtrid}


@pytest.mark.parametrize("body", ["caf\udce9", 7], ids=["lone-surrogate", "not-str"])
def test_a_body_no_frame_can_carry_fails_only_its_own_send(
    broker: Broker, stomp_addr: str, queue_name: str, body: Any
) -> None:
    """A body that is not a str or has a lone surrogate (stomp.py would write '?') fails
    its send at once; the other messages commit."""
    sends = [(queue_name, "first", {}), (queue_name, body, {}), (queue_name, "é", {})]
    gtrid, refused = broker.transaction(sends)
    assert refused == ["body"]
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["first", "é"]
    assert broker.sync.markers() == {gtrid}


def test_a_transaction_with_a_refused_header_rolls_back_cleanly(
    broker: Broker, stomp_addr: str, queue_name: str
) -> None:
    """After a refused header the transaction may roll back: nothing of it is left."""
    sends = [(queue_name, "first", {}), (queue_name, "bad", {"expires": "1"})]
    gtrid, refused = broker.transaction(sends, commit=False)
    assert refused == ["expires"]
    assert browse(stomp_addr, queue_name) == []
    assert gtrid not in broker.sync.markers()
    _, refused = broker.transaction([(queue_name, "next", {})])  # the pool is healthy
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["next"]


@pytest.mark.parametrize("ahead", [False, True], ids=["group-commit", "sent-ahead"])
def test_a_connection_lost_before_the_commit_frame_is_commit_not_sent(
    broker: Broker, stomp_addr: str, queue_name: str, ahead: bool
) -> None:
    """The connection lost just before the COMMIT frame: CommitNotSent (a refusal, so the
    coordinator aborts), never a doubt; nothing committed; the pool still commits."""
    raised = broker.commit_on_a_lost_connection(queue_name, ahead=ahead)
    assert isinstance(raised, CommitNotSent), repr(raised)
    assert "nothing was committed" in str(raised)
    assert browse(stomp_addr, queue_name) == []
    gtrid, _ = broker.transaction([(queue_name, "next", {})])
    assert [m.body for m in browse(stomp_addr, queue_name)] == ["next"]
    assert broker.sync.markers() == {gtrid}  # the lost one left no marker


BAD_MESSAGES: list[tuple[Any, dict[str, Any]]] = [
    ("bad", {"x\ndestination": "/queue/other"}),
    ("bad", {"x\r\n\r\nbody": "?"}),
    ("bad", {"expires": "1"}),
    ("bad", {"priority": "abc"}),
    ("bad", {"AMQ_SCHEDULED_DELAY": "abc"}),
    ("bad", {"k": "a\x00b"}),
    ("bad", {"": "empty"}),
    ("bad", {"persistent": "false"}),
    ("caf\udce9", {}),
    (7, {}),
]


def test_bad_headers_never_touch_other_threads_group_commits(
    stomp_addr: str, queue_name: str
) -> None:
    """One thread sends bad messages while seven commit under group commit: all of theirs commit."""
    resource = ActiveMQ(
        stomp_addr,
        unique("t"),
        pool_size=8,
        marker_queue=fresh_queue("markers"),
        **stomp_login(),
    )
    other = fresh_queue("other")
    failed: list[TwoPhaseCommitError] = []  # list.append is atomic: the threads share it

    def well_formed(_: int) -> list[str]:
        committed = []
        for _ in range(40):
            try:
                committed.append(commit_one(resource, queue_name))
            except TwoPhaseCommitError as exc:
                failed.append(exc)
        return committed

    def hostile() -> tuple[list[str], int]:
        committed, refused = [], 0
        for i in range(40):
            gtrid = unique("t.")
            session = resource.begin(gtrid)
            try:
                session.send(queue_name, "good", {"transfer-id": gtrid})
                body, headers = BAD_MESSAGES[i % len(BAD_MESSAGES)]
                try:
                    session.send(other, body, headers)
                except InvalidMessage:
                    refused += 1
                session.commit_with_marker(gtrid, timeout=5.0)
                committed.append(gtrid)
            except TwoPhaseCommitError as exc:
                failed.append(exc)
            finally:
                session.release()
        return committed, refused

    try:
        with ThreadPoolExecutor(8) as pool:
            hostile_run = pool.submit(hostile)
            batches = list(pool.map(well_formed, range(7)))
            hostile_gtrids, refused = hostile_run.result()
        assert [type(exc).__name__ for exc in failed] == []
        assert refused == 40
        gtrids = {g for batch in batches for g in batch} | set(hostile_gtrids)
        assert len(gtrids) == 320
        group = resource.group_commit
        assert group.items == 320
        assert group.batches < group.items  # commits were shared
        assert resource.markers() == gtrids  # every one committed, none in doubt
        assert {m.headers["transfer-id"] for m in browse(stomp_addr, queue_name)} == gtrids
        assert browse(stomp_addr, other) == []
    finally:
        resource.close()


def test_each_coordinator_has_a_marker_queue_of_its_own(stomp_addr: str) -> None:
    """A coordinator's markers go to /queue/twopc.markers.<its id>: another coordinator's
    sweep neither sees them nor takes the browse sentinel the first one left there."""
    first, second = (
        ActiveMQ(stomp_addr, unique("q"), pool_size=1, shared_marker_queue=None, **stomp_login())
        for _ in range(2)
    )
    try:
        assert first.marker_queue == marker_queue_for(first.coordinator_id)
        assert first.marker_queue == f"/queue/twopc.markers.{first.coordinator_id}"
        mine = commit_one(first, fresh_queue())
        theirs = commit_one(second, fresh_queue())
        assert first.markers() == {mine}  # leaves its browse sentinel on its queue
        assert second.markers() == {theirs}
        assert second.remove_markers([theirs, mine]) == 1
        assert sum(m.is_sentinel for m in browse(stomp_addr, first.marker_queue)) == 1
        assert first.markers() == {mine}
        assert first.remove_markers([mine]) == 1
        assert browse(stomp_addr, first.marker_queue) == []  # its sentinels went with it
        assert browse(stomp_addr, second.marker_queue) == []
    finally:
        first.close()
        second.close()


def test_markers_left_on_the_shared_queue_count_until_the_sweep_removes_them(
    stomp_addr: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator's markers on the queue every coordinator shared before count as its
    markers; removing them leaves the other coordinators' markers there, and once none of
    its own is left the shared queue is no longer read."""
    # The browse sentinels left here count as left over at once (a real one waits for
    # SENTINEL_LEFTOVER_AFTER: see the test below).
    monkeypatch.setattr(stomp_core, "SENTINEL_LEFTOVER_AFTER", 0.0)
    shared = fresh_queue("shared")
    cid, other = unique("m"), unique("o")
    fill_markers(stomp_addr, shared, [f"{cid}.1", f"{other}.1", f"{cid}.2,{cid}.3"])
    mq = ActiveMQ(
        stomp_addr,
        cid,
        pool_size=1,
        marker_queue=fresh_queue("markers"),
        shared_marker_queue=shared,
        **stomp_login(),
    )
    try:
        mine = commit_one(mq, fresh_queue())
        ours = {f"{cid}.1", f"{cid}.2", f"{cid}.3"}
        assert mq.markers() == {mine, *ours}
        assert mq.remove_markers(ours) == 3
        assert [m.headers.get("gtrid") for m in browse(stomp_addr, shared)] == [f"{other}.1"]
        assert mq.markers() == {mine}  # read once more: none of ours, sentinel dropped
        assert [m.headers.get("gtrid") for m in browse(stomp_addr, shared)] == [f"{other}.1"]
        fill_markers(stomp_addr, shared, [f"{cid}.4"])  # never written there in practice
        assert mq.markers() == {mine}  # not read again
    finally:
        mq.close()


def test_a_sweep_of_the_shared_queue_leaves_the_sentinel_of_a_browse_still_running(
    stomp_addr: str,
) -> None:
    """A coordinator starting up drops only left-over browse sentinels from the shared
    queue: a young one may be another coordinator's browse in progress, which would end
    without it (BrowseIncomplete) if it went."""
    shared = fresh_queue("shared")
    young = stomp_core.sentinel_token()
    old = f"{time.time_ns() // 1_000_000 - 3_600_000}-{uuid.uuid4().hex}"  # an hour ago
    earlier_version = uuid.uuid4().hex  # a token without its time
    with open_stomp_client(stomp_addr) as client:
        for token in (old, young, earlier_version):
            client.send(shared, "", {SENTINEL_HEADER: token}, receipt_timeout=5.0)
    mq = ActiveMQ(
        stomp_addr,
        unique("m"),
        pool_size=1,
        marker_queue=fresh_queue("markers"),
        shared_marker_queue=shared,
        **stomp_login(),
    )
    try:
        assert mq.markers() == set()  # none of its own there: it sweeps the shared queue
    finally:
        mq.close()
    left = [m.headers[SENTINEL_HEADER] for m in browse(stomp_addr, shared)]
    assert young in left
    assert old not in left
    assert earlier_version not in left


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_a_sweep_takes_what_it_browsed_though_the_broker_delivers_in_another_order(
    stomp_addr: str, api: str
) -> None:
    """A message a closed consumer gave back is delivered after another one given back
    first, though the browse shows it ahead: the sweep still takes the left-over sentinel
    it browsed, and leaves the young one."""
    queue = fresh_queue("shared")
    old = f"{time.time_ns() // 1_000_000 - 3_600_000}-{uuid.uuid4().hex}"  # an hour ago
    young = stomp_core.sentinel_token()
    with open_stomp_client(stomp_addr) as first, open_stomp_client(stomp_addr) as second:
        for token in (old, young):
            first.send(queue, "", {SENTINEL_HEADER: token}, receipt_timeout=5.0)
        # Each consumer holds one sentinel unacked; the second gives its one back first.
        held_old = first.subscribe(queue, ack="client-individual", prefetch=1, timeout=5.0)
        assert (held_old.get(5.0) or pytest.fail("no message")).headers[SENTINEL_HEADER] == old
        held_young = second.subscribe(queue, ack="client-individual", prefetch=1, timeout=5.0)
        assert (held_young.get(5.0) or pytest.fail("no message")).headers[SENTINEL_HEADER] == young
        held_young.unsubscribe(timeout=5.0)
        held_old.unsubscribe(timeout=5.0)
    assert [m.headers[SENTINEL_HEADER] for m in browse(stomp_addr, queue)] == [old, young]
    if api == "sync":
        with open_stomp_client(stomp_addr) as client:
            result = consume_markers(client, queue, set(), 2.0)
    else:

        async def main() -> tuple[set[str], set[str]]:
            async with await AsyncStompClient.open(stomp_addr, **stomp_login()) as client:
                return await aconsume_markers(client, queue, set(), 2.0)

        result = asyncio.run(main())
    assert result == (set(), set())
    assert [m.headers[SENTINEL_HEADER] for m in browse(stomp_addr, queue)] == [young]


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_two_sweeps_at_once_do_not_wait_for_what_the_other_took(stomp_addr: str, api: str) -> None:
    """Two coordinators starting together both sweep the left-over sentinels of the
    shared queue: both sweeps end long before their timeout (120 s here), and every
    left-over is gone. The one that lost the race used to wait its whole timeout."""
    queue = fresh_queue("shared")
    hour_ago = time.time_ns() // 1_000_000 - 3_600_000
    with open_stomp_client(stomp_addr) as client:
        for _ in range(20):
            token = f"{hour_ago}-{uuid.uuid4().hex}"
            client.send(queue, "", {SENTINEL_HEADER: token}, receipt_timeout=5.0)
    if api == "sync":
        together = threading.Barrier(2)

        def sweep() -> tuple[set[str], set[str]]:
            with open_stomp_client(stomp_addr) as client:
                together.wait()
                return consume_markers(client, queue, set(), 120.0)

        with ThreadPoolExecutor(2) as pool:
            sweeps = [pool.submit(sweep) for _ in range(2)]
            results = [future.result(timeout=30) for future in sweeps]
    else:

        async def asweep() -> tuple[set[str], set[str]]:
            async with await AsyncStompClient.open(stomp_addr, **stomp_login()) as client:
                return await aconsume_markers(client, queue, set(), 120.0)

        async def main() -> list[tuple[set[str], set[str]]]:
            return list(await asyncio.wait_for(asyncio.gather(asweep(), asweep()), 30))

        results = asyncio.run(main())
    assert results == [(set(), set()), (set(), set())]
    assert browse(stomp_addr, queue) == []


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_a_browse_that_misses_its_sentinel_is_tried_again_with_a_new_one(
    stomp_addr: str, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    """browse_complete tries again when a browse ended before its sentinel (another
    sweep held the queue a moment); BrowseIncomplete names the tries once all missed."""
    queue = fresh_queue("browse")
    fill_markers(stomp_addr, queue, ["b.1", "b.2"])
    empty = [0]  # how many browses are still to come back empty

    def emptied(found: list[Any]) -> list[Any]:
        if empty[0] > 0:
            empty[0] -= 1
            return []
        return found

    real = StompOperations.browse if api == "sync" else AsyncStompOperations.browse
    if api == "sync":
        monkeypatch.setattr(
            StompOperations, "browse", lambda self, *a, **k: emptied(real(self, *a, **k))
        )
    else:

        async def abrowse(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
            return emptied(await real(self, *args, **kwargs))

        monkeypatch.setattr(AsyncStompOperations, "browse", abrowse)

    def browse_complete(tries: int) -> list[str]:
        if api == "sync":
            with open_stomp_client(stomp_addr) as client:
                found = client.browse_complete(queue, tries=tries)
        else:

            async def main() -> list[Any]:
                async with await AsyncStompClient.open(stomp_addr, **stomp_login()) as client:
                    return await client.browse_complete(queue, tries=tries)

            found = asyncio.run(main())
        return [m.headers["gtrid"] for m in found]

    empty[0] = 2
    with capture_logs() as logs:
        assert browse_complete(3) == ["b.1", "b.2"]
    assert empty[0] == 0
    assert [e["attempt"] for e in logs if e["event"] == "stomp.browse.retried"] == [1, 2]
    empty[0] = 3
    with pytest.raises(BrowseIncomplete, match=r"the last of 3 browses"):
        browse_complete(3)
    assert empty[0] == 0


def test_recovery_commits_by_a_marker_an_earlier_version_left_on_the_shared_queue(
    settings: Settings, tmp_path: Path
) -> None:
    """A branch prepared before the queue per coordinator, its marker on /queue/twopc.markers,
    is committed by the next start's recovery, which then removes that marker."""
    ident = unique("old")
    gtrid = f"{ident}.{uuid.uuid4().hex[:24]}"
    a = PostgresResource("a", settings.pg_a, pool_size=1)
    try:
        branch = a.begin(Xid.branch(gtrid, "a"))
        branch.execute("CREATE TABLE IF NOT EXISTS shared_marker_probe (tag text)")
        branch.execute("INSERT INTO shared_marker_probe VALUES (%s)", (gtrid,))
        branch.send_prepare()
        branch.prepare()
        branch.release()
    finally:
        a.close()
    fill_markers(settings.stomp, SHARED_MARKER_QUEUE, [gtrid])
    coordinator = open_coordinator(replace(settings, coordinator_id=ident, home=tmp_path))
    try:
        report = coordinator.last_recovery
        assert report is not None
        assert [(i.gtrid, i.marker, i.decision.value) for i in report.items] == [
            (gtrid, True, "commit")
        ]
    finally:
        coordinator.close()
    with psycopg.connect(settings.pg_a) as conn:
        found = conn.execute("SELECT count(*) FROM shared_marker_probe WHERE tag = %s", (gtrid,))
        assert found.fetchone() == (1,)
    left = browse(settings.stomp, SHARED_MARKER_QUEUE)
    assert gtrid not in {g for m in left for g in m.headers.get("gtrid", "").split(",")}


def test_a_browse_of_a_queue_deeper_than_the_brokers_memory_ends_early_and_says_so(
    settings: Settings,
) -> None:
    """A browse sees only what the broker holds in memory (the lab's 32 MB a queue): a plain
    browse ends early as if complete, browse_complete raises BrowseIncomplete naming the
    memory limit, and the scenario's checks refuse to count on it, saying to empty the queue."""
    queue = fresh_queue("deep")
    body = "x" * 65_536
    count = 700  # 45 MB: more than the queue's 32 MB in memory
    try:
        with open_stomp(settings) as client:
            for i in range(count):
                receipt = 5.0 if i == count - 1 else None
                client.send(queue, body, {"n": str(i)}, receipt_timeout=receipt)
            seen = len(client.browse(queue, idle_timeout=10.0))
            assert 0 < seen < count
            with pytest.raises(BrowseIncomplete, match="memoryLimit"):
                client.browse_complete(queue)
            with pytest.raises(ParticipantError, match="twopc transfer --reset") as err:
                every_message(client, queue)
        assert not isinstance(err.value, BrowseIncomplete)
    finally:
        assert drain(settings, queue) >= count


def test_drain_empties_several_queues_at_once_and_counts_what_it_dropped(
    stomp_addr: str, settings: Settings
) -> None:
    """drain() consumes what the tests' fresh queues hold, all at once, and counts it."""
    first, second = fresh_queue(), fresh_queue("other")
    assert {first, second} <= set(named_queues())
    with open_stomp_client(stomp_addr) as client:
        for n in range(3):
            client.send(first, f"m{n}", receipt_timeout=5.0)
        client.send(second, "m", receipt_timeout=5.0)
        assert drain(settings, first, second, idle=0.5) == 4
        assert client.browse(first, idle_timeout=1.0) == []
        assert client.browse(second, idle_timeout=1.0) == []
