"""Opening a STOMP connection to a broker whose end resets as it opens: both clients raise
ParticipantUnavailable, never the socket's own error (local sockets, no lab)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator.errors import ParticipantUnavailable
from participants.aio.stomp import AsyncStompClient
from participants.stomp_client import StompClient


@pytest.fixture
def resetting_listener() -> Iterator[str]:
    """A local listener that accepts each connection and resets it at once (RST)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


def test_a_connection_reset_as_it_opens_is_unavailable_on_threads(resetting_listener: str) -> None:
    """The blocking client: ParticipantUnavailable for a connection reset at once."""
    for _ in range(5):
        with pytest.raises(ParticipantUnavailable, match="STOMP broker at"):
            StompClient.open(resetting_listener, connect_timeout=2)


def test_a_connection_reset_as_it_opens_is_unavailable_on_asyncio(resetting_listener: str) -> None:
    """The asyncio client: ParticipantUnavailable for a connection reset at once."""

    async def scenario() -> None:
        for _ in range(5):
            with pytest.raises(ParticipantUnavailable, match="STOMP broker at"):
                await AsyncStompClient.open(resetting_listener, connect_timeout=2)

    asyncio.run(scenario())


def test_a_socket_let_go_before_its_options_are_set_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The asyncio client: when the reset is read before the opener resumes, the transport
    has closed the socket (its fd is -1) and setting TCP_NODELAY fails with EBADF; the
    opener says ParticipantUnavailable, not OSError."""
    real = asyncio.open_connection

    async def reset_before_resuming(*args: Any, **kwargs: Any) -> Any:
        reader, writer = await real(*args, **kwargs)
        writer.transport.abort()  # what the transport does once it reads the reset
        await asyncio.sleep(0)
        return reader, writer

    monkeypatch.setattr(asyncio, "open_connection", reset_before_resuming)

    async def scenario(address: str) -> None:
        with pytest.raises(ParticipantUnavailable, match="closed as soon as it opened"):
            await AsyncStompClient.open(address, connect_timeout=2)

    with socket.create_server(("127.0.0.1", 0)) as listener:  # the kernel accepts: no reset
        asyncio.run(scenario(f"127.0.0.1:{listener.getsockname()[1]}"))
