"""The blocking client over stomp.py's transport, against a scripted broker on a local socket.

The client relies on stomp.py internals in one place
(``participants.stomp_client._read_into_core``): its receiver loop reads
through ``transport.receive``, takes a lone end-of-line for a heart-beat
without parsing anything, and ends at an empty read. These tests fail if a
stomp.py release changes that. The real broker is tests/test_activemq.py's.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import stomp.transport

from coordinator.errors import ParticipantUnavailable
from participants.stomp_client import StompClient
from participants.stomp_frames import FrameReader, ReceivedFrame


class ScriptedBroker:
    """Accepts one connection; answers CONNECT and every receipt; sends what a test pushes."""

    def __init__(self, connected: bytes) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._connected = connected
        self._conn: socket.socket | None = None
        self._accepted = threading.Event()
        self.received: list[ReceivedFrame] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        self._conn = conn
        self._accepted.set()
        reader = FrameReader()
        while data := conn.recv(4096):
            reader.feed(data)
            while (item := reader.next()) is not None:
                if not isinstance(item, ReceivedFrame):
                    continue
                self.received.append(item)
                if item.command == "CONNECT":
                    conn.sendall(self._connected)
                elif "receipt" in item.headers:
                    conn.sendall(
                        b"RECEIPT\nreceipt-id:%s\n\n\x00" % item.headers["receipt"].encode()
                    )

    def push(self, data: bytes) -> None:
        """Send ``data`` to the client."""
        assert self._accepted.wait(5) and self._conn is not None
        self._conn.sendall(data)

    def close(self) -> None:
        """Close the client's connection (the broker went away)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):  # closed already
                self._conn.shutdown(socket.SHUT_RDWR)
            self._conn.close()
        self._listener.close()


@pytest.fixture
def parsed_by_stomp_py(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The frames stomp.py's receiver parses itself (a spy on its parse_frame)."""
    calls: list[bytes] = []
    real = stomp.transport.parse_frame

    def spy(frame: bytes) -> Any:
        calls.append(frame)
        return real(frame)

    monkeypatch.setattr(stomp.transport, "parse_frame", spy)
    return calls


@pytest.fixture
def broker() -> Iterator[ScriptedBroker]:
    scripted = ScriptedBroker(b"CONNECTED\nversion:1.2\nheart-beat:0,1500\n\n\x00")
    yield scripted
    scripted.close()


def test_frames_reach_the_core_without_stomp_py_parsing_them(
    broker: ScriptedBroker, parsed_by_stomp_py: list[bytes]
) -> None:
    """Receipts and messages (escaped headers, NULs in the body) reach the core; stomp.py
    parses only the CONNECTED the client hands it."""
    client = StompClient.open(broker.address, heartbeats=(1000, 0))
    try:
        subscription = client.subscribe("/queue/q", timeout=5)
        broker.push(
            b"MESSAGE\nsubscription:%s\nmessage-id:ID\\c1\ncontent-length:3\n\na\x00b\x00"
            % subscription.id.encode()
        )
        message = subscription.get(5)
        assert message is not None
        assert (message.message_id, message.body) == ("ID:1", "a\x00b")
        assert [frame.split(b"\n", 1)[0] for frame in parsed_by_stomp_py] == [b"CONNECTED"]
    finally:
        client.drop()


def test_stomp_py_sees_the_connection_up_with_the_heart_beats_the_core_agreed(
    broker: ScriptedBroker,
) -> None:
    """stomp.py's transport counts as connected and its heart-beat listener runs with the
    pair the core agreed (we offer to send every 1000 ms, the broker wants 1500: 1500)."""
    client = StompClient.open(broker.address, heartbeats=(1000, 0))
    try:
        assert client._protocol.heartbeats == (1500, 0)
        assert client._conn.heartbeats == client._protocol.heartbeats
        assert client._conn.transport.is_connected()
        assert client._conn.heartbeat_thread is not None
    finally:
        client.drop()


def test_the_broker_closing_the_socket_wakes_readers_and_ends_the_connection(
    broker: ScriptedBroker,
) -> None:
    """An empty read still ends stomp.py's receiver loop: a reader learns the loss."""
    client = StompClient.open(broker.address)
    try:
        subscription = client.subscribe("/queue/q", timeout=5)
        broker.close()
        with pytest.raises(ParticipantUnavailable, match="connection lost"):
            subscription.get(5)
        assert not client.alive
    finally:
        client.drop()


def test_bytes_that_are_not_stomp_end_the_connection(broker: ScriptedBroker) -> None:
    """A frame the core refuses (an undefined escape) ends the connection: readers wake."""
    client = StompClient.open(broker.address)
    try:
        subscription = client.subscribe("/queue/q", timeout=5)
        broker.push(b"MESSAGE\nsubscription:%s\nx:a\\tb\n\nhi\x00" % subscription.id.encode())
        with pytest.raises(ParticipantUnavailable, match="connection lost"):
            subscription.get(5)
        assert not client.alive
    finally:
        client.drop()
