"""An asyncio STOMP 1.2 connection for the last resource: the protocol core over streams.

The counterpart of :mod:`participants.stomp_client` for asyncio streams. What
STOMP says (frames and their escapes, receipts, which ERROR answers what, the
refusal of CONNECT, heart-beats) is :class:`~participants.stomp_core.StompProtocol`'s;
this module moves its bytes and waits: CONNECT (client-id, login, TLS,
TCP_NODELAY), BEGIN, SEND, ACK, COMMIT and ABORT with receipts awaited up to
a timeout, ERROR frames that answer no request counted so that a COMMIT can
refuse, corked writes (a transaction's frames in one write with its COMMIT),
subscriptions read with :meth:`AsyncSubscription.get`, and queue browses
(:meth:`AsyncStompClient.browse_complete`). The failures are the same twopc
errors with the same words as the sync client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.errors import ParticipantUnavailable
from coordinator.events import get_logger
from participants import events as ev
from participants.aio.stomp_ops import AsyncStompOperations, Waiter
from participants.stomp_client import AckMode, tls_context
from participants.stomp_core import (
    Answer,
    ClientIdInUse,
    Connected,
    ConnectRefused,
    Event,
    Message,
    MessageReceived,
    NoAnswer,
    Refused,
    StompProtocol,
    StompProtocolError,
    UnansweredError,
    encode,
    parse_address,
)

__all__ = ["AsyncStompClient", "AsyncSubscription", "encode"]

#: Bytes read at once from the stream.
READ_BYTES = 64 * 1024


def _log() -> Any:
    return get_logger(component="stomp")


class _ConnectionLost:
    """Queued to subscriptions when the connection drops."""


_LOST = _ConnectionLost()


class AsyncSubscription:
    """One SUBSCRIBE: its MESSAGE frames arrive in a queue read by :meth:`get`."""

    def __init__(self, client: AsyncStompClient, sub_id: str, destination: str) -> None:
        self.client = client
        self.id = sub_id
        self.destination = destination
        self._queue: asyncio.Queue[Message | _ConnectionLost] = asyncio.Queue()

    async def get(self, timeout: float) -> Message | None:
        """The next message, or None after ``timeout`` seconds; ParticipantUnavailable if lost."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if isinstance(item, _ConnectionLost):
            self._queue.put_nowait(item)  # every later get() fails the same way
            raise self.client.unavailable(f"connection lost while reading {self.destination}")
        return item

    async def unsubscribe(self, timeout: float | None = None) -> None:
        """UNSUBSCRIBE; with a ``timeout``, wait for the receipt (all earlier ACKs processed)."""
        await self.client.request(
            "UNSUBSCRIBE", {"id": self.id}, timeout=timeout, what=f"UNSUBSCRIBE {self.destination}"
        )
        self.client._subscriptions.pop(self.id, None)

    def _deliver(self, message: Message) -> None:
        self._queue.put_nowait(message)

    def _lost(self) -> None:
        self._queue.put_nowait(_LOST)


@dataclass(frozen=True, slots=True)
class _Waiter:
    """An awaited receipt: its id and the future its answer settles."""

    receipt_id: str
    answer: asyncio.Future[str | None]


class AsyncStompClient(AsyncStompOperations):
    """One STOMP 1.2 connection over asyncio streams, opened by :meth:`open`."""

    def __init__(
        self,
        address: str,
        *,
        participant: str,
        client_id: str | None,
        login: str | None = None,
        passcode: str | None = None,
    ) -> None:
        self.address = address
        self.participant = participant
        self.client_id = client_id
        self._protocol = StompProtocol(
            address, participant=participant, client_id=client_id, login=login, passcode=passcode
        )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected: asyncio.Future[Connected | ConnectRefused] | None = None
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._lost = False
        self._receiver: asyncio.Task[None] | None = None
        self._subscriptions: dict[str, AsyncSubscription] = {}
        # Frames kept by corked(): written in one write with the COMMIT.
        self._corked: list[bytes] | None = None
        self._corked_by: asyncio.Task[Any] | None = None

    @classmethod
    async def open(
        cls,
        address: str,
        *,
        participant: str = "mq",
        client_id: str | None = None,
        connect_timeout: float = 5.0,
        login: str | None = None,
        passcode: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
    ) -> AsyncStompClient:
        """CONNECT to ``address``; ClientIdInUse, BrokerLoginRefused or ParticipantUnavailable."""
        client = cls(
            address, participant=participant, client_id=client_id, login=login, passcode=passcode
        )
        await client._connect(connect_timeout, tls, ca_file)
        return client

    # -- state ---------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while the connection is up (an ERROR frame does not end it; a drop does)."""
        return self._writer is not None and not self._lost

    @property
    def error_count(self) -> int:
        """How many ERROR frames came that answered no request (a SEND without receipt)."""
        return self._protocol.error_count

    def errors_since(self, count: int) -> list[str]:
        """The messages of the unanswered ERROR frames after the first ``count``."""
        return self._protocol.errors_since(count)

    # -- frames --------------------------------------------------------------

    async def subscribe(
        self,
        destination: str,
        *,
        ack: AckMode = "auto",
        prefetch: int | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = 5.0,
    ) -> AsyncSubscription:
        """SUBSCRIBE to ``destination``; waits for the receipt so a refusal raises here.

        ``prefetch`` is ActiveMQ's ``activemq.prefetchSize``; read the messages
        with :meth:`AsyncSubscription.get`.
        """
        sub_id = self._protocol.next_id("sub")
        subscription = AsyncSubscription(self, sub_id, destination)
        frame_headers = dict(headers or {})
        frame_headers.update({"destination": destination, "id": sub_id, "ack": ack})
        if prefetch is not None:
            frame_headers["activemq.prefetchSize"] = str(prefetch)
        self._subscriptions[sub_id] = subscription
        try:
            await self.request(
                "SUBSCRIBE", frame_headers, timeout=timeout, what=f"SUBSCRIBE to {destination}"
            )
        except BaseException:
            self._subscriptions.pop(sub_id, None)
            raise
        return subscription

    @contextlib.asynccontextmanager
    async def corked(self) -> AsyncIterator[None]:
        """Keep the frames this task writes in the block, and send them in one write: with
        the next COMMIT or the next frame whose receipt is awaited, or when the block ends.
        If the block raises, the frames kept are dropped: none reached the broker.
        """
        self._corked, self._corked_by = [], asyncio.current_task()
        try:
            yield
        except BaseException:
            self._corked = self._corked_by = None
            raise
        await self._uncork(None)

    # -- closing -------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """DISCONNECT, wait up to ``timeout`` for its receipt, then close. Never raises."""
        if self.alive:
            with contextlib.suppress(Exception):
                await self.request("DISCONNECT", {}, timeout=timeout, what="DISCONNECT")
                if self._receiver is not None:  # ActiveMQ closes the socket after the receipt
                    await asyncio.wait({self._receiver}, timeout=timeout)
        self.drop()

    def drop(self) -> None:
        """Close the socket now, without DISCONNECT (state unknown, or fencing). Never raises."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._receiver is not None and not self._receiver.done():
            self._receiver.cancel()
        self._on_lost()

    async def __aenter__(self) -> AsyncStompClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------

    async def _connect(self, timeout: float, tls: bool, ca_file: str | None) -> None:
        host, port = parse_address(self.address)
        context = tls_context(ca_file) if tls else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise self.unavailable(
                f"cannot connect ({str(exc) or 'connection refused or timed out'})"
            ) from None
        self._reader, self._writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Nagle's algorithm would hold a COMMIT behind the broker's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connected = asyncio.get_running_loop().create_future()
        self._receiver = asyncio.create_task(self._receive())
        await self._write(self._protocol.connect().data, "CONNECT", None)
        try:
            answer = await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except (TimeoutError, NoAnswer):
            self.drop()
            if self._lost and self.client_id:
                # ActiveMQ answers a held client-id with an ERROR and closes the socket;
                # the close can win the race with the ERROR frame.
                raise ClientIdInUse(
                    self.client_id,
                    "the broker closed the connection during CONNECT",
                    participant=self.participant,
                ) from None
            raise self.unavailable(f"no CONNECTED frame within {timeout:g} s") from None
        if isinstance(answer, Connected):
            _log().debug(ev.STOMP_CONNECTED, address=self.address, client_id=self.client_id)
            return
        self.drop()
        raise answer.error

    async def _transmit(
        self,
        command: str,
        headers: Mapping[str, str],
        body: str,
        gtrid: str | None,
        *,
        receipt: bool = False,
    ) -> Waiter | None:
        """Write one frame (or keep it, corked); with ``receipt``, the waiter of its answer."""
        out = self._protocol.frame(command, headers, body, receipt=receipt, gtrid=gtrid)
        waiter = None
        if out.receipt_id is not None:
            waiter = _Waiter(out.receipt_id, asyncio.get_running_loop().create_future())
            self._pending[out.receipt_id] = waiter.answer
        if self._corked is not None and self._corked_by is asyncio.current_task():
            self._corked.append(out.data)
            return waiter
        try:
            await self._write(out.data, command, gtrid)
        except ParticipantUnavailable:
            if waiter is not None:
                self._give_up(waiter)
            raise
        return waiter

    async def _read(
        self, destination: str, *, prefetch: int, headers: Mapping[str, str], timeout: float
    ) -> AsyncSubscription:
        return await self.subscribe(
            destination, prefetch=prefetch, headers=headers, timeout=timeout
        )

    def _forget_subscription(self, sub_id: str) -> None:
        self._subscriptions.pop(sub_id, None)

    async def _uncork(self, gtrid: str | None) -> None:
        """Send the frames kept so far in one write (ParticipantUnavailable if it fails)."""
        kept, self._corked, self._corked_by = self._corked, None, None
        if not kept:
            return
        await self._write(b"".join(kept), f"{len(kept)} frames", gtrid)

    async def _write(self, data: bytes, what: str, gtrid: str | None) -> None:
        if self._lost or self._writer is None:
            raise self.unavailable(f"cannot send {what}: the connection is closed", gtrid)
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            self._on_lost()
            raise self.unavailable(
                f"connection lost while sending {what} ({type(exc).__name__})", gtrid
            ) from None

    def _give_up(self, waiter: Waiter) -> None:
        """Nobody waits for ``waiter``'s receipt any more."""
        self._pending.pop(waiter.receipt_id, None)
        self._protocol.forget(waiter.receipt_id)

    async def _wait(self, waiter: Waiter, timeout: float) -> None:
        assert isinstance(waiter, _Waiter)
        try:
            error = await asyncio.wait_for(asyncio.shield(waiter.answer), timeout)
        except TimeoutError:
            self._give_up(waiter)
            raise NoAnswer(f"no answer came within {timeout:g} s") from None
        if error is not None:
            raise Refused(error)

    async def _receive(self) -> None:
        """The receiver task: bytes to the protocol core, its events to their waiters."""
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(READ_BYTES)
                for event in self._protocol.receive_data(data):
                    self._dispatch(event)
                if not data:
                    return
        except OSError:
            pass  # the connection is gone: its waiters learn it below
        except StompProtocolError as exc:
            _log().warning(ev.STOMP_ERROR, address=self.address, error=str(exc))
        finally:
            self._on_lost()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Connected | ConnectRefused):
            if self._connected is not None and not self._connected.done():
                self._connected.set_result(event)
        elif isinstance(event, Answer):
            answer = self._pending.pop(event.receipt_id, None)
            if answer is not None and not answer.done():
                answer.set_result(event.error)
        elif isinstance(event, UnansweredError):
            _log().warning(ev.STOMP_ERROR, address=self.address, error=event.message)
        elif isinstance(event, MessageReceived):
            subscription = self._subscriptions.get(event.subscription)
            if subscription is not None:
                subscription._deliver(event.message)

    def _on_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._protocol.connection_lost()
        pending, self._pending = list(self._pending.values()), {}
        for answer in pending:
            if not answer.done():
                answer.set_exception(NoAnswer("the connection was lost before the answer came"))
        for subscription in self._subscriptions.values():
            subscription._lost()
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(NoAnswer("the connection closed during CONNECT"))
