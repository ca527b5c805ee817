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
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from coordinator.errors import CommitRefused, OutcomeUnknown, ParticipantUnavailable
from coordinator.events import get_logger
from participants import events as ev
from participants.stomp_client import AckMode, tls_context
from participants.stomp_core import (
    SENTINEL_HEADER,
    UNAVAILABLE_HINT,
    Answer,
    BrokerRefused,
    BrowseIncomplete,
    ClientIdInUse,
    Connected,
    ConnectRefused,
    Event,
    Message,
    MessageReceived,
    StompProtocol,
    StompProtocolError,
    UnansweredError,
    check_destination,
    encode,
    parse_address,
)

__all__ = ["AsyncStompClient", "AsyncSubscription", "encode"]

#: Bytes read at once from the stream.
READ_BYTES = 64 * 1024


def _log() -> Any:
    return get_logger(component="stomp")


class _NoAnswer(Exception):
    """No RECEIPT and no ERROR: timeout or connection lost (translated by callers)."""


class _Refused(Exception):
    """An ERROR frame answered the request (translated by callers)."""


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


class AsyncStompClient:
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

    def unavailable(self, reason: str, gtrid: str | None = None) -> ParticipantUnavailable:
        return ParticipantUnavailable(
            f"STOMP broker at {self.address}: {reason}; {UNAVAILABLE_HINT}",
            participant=self.participant,
            gtrid=gtrid,
        )

    # -- frames --------------------------------------------------------------

    async def send(
        self,
        destination: str,
        body: str,
        headers: Mapping[str, str] | None = None,
        *,
        transaction: str | None = None,
        receipt_timeout: float | None = None,
        gtrid: str | None = None,
    ) -> None:
        """SEND a persistent message, inside ``transaction`` if given (as the sync client)."""
        check_destination(destination)
        frame_headers = dict(headers or {})
        frame_headers["destination"] = destination
        frame_headers["persistent"] = "true"
        if transaction is not None:
            frame_headers["transaction"] = transaction
        if body:
            frame_headers["content-length"] = str(len(body))
        await self.request(
            "SEND",
            frame_headers,
            body,
            timeout=receipt_timeout,
            what=f"SEND to {destination}",
            gtrid=gtrid,
        )

    async def begin(self, transaction: str, *, gtrid: str | None = None) -> None:
        """BEGIN ``transaction`` (no receipt: an ERROR would fail the COMMIT anyway)."""
        await self.request("BEGIN", {"transaction": transaction}, what="BEGIN", gtrid=gtrid)

    async def commit(
        self,
        transaction: str,
        timeout: float,
        *,
        gtrid: str | None = None,
        after_send: Callable[[], None] | None = None,
    ) -> None:
        """COMMIT and wait for the receipt; errors as :meth:`StompClient.commit`."""
        receipt_id, answer = await self._transmit(
            "COMMIT", {"transaction": transaction}, "", gtrid, receipt=True
        )
        assert receipt_id is not None and answer is not None
        if self._corked is not None:
            try:
                await self._uncork(gtrid)
            except ParticipantUnavailable:
                self._give_up(receipt_id)
                raise
        if after_send is not None:
            after_send()
        try:
            await self._wait(receipt_id, answer, timeout)
        except _Refused as exc:
            raise CommitRefused(
                f"the broker refused the COMMIT: {exc}; nothing was committed",
                participant=self.participant,
                gtrid=gtrid,
            ) from None
        except _NoAnswer as exc:
            raise OutcomeUnknown(
                f"COMMIT sent to the STOMP broker at {self.address}, but {exc}; whether it "
                "committed is known only after fencing ('twopc recover' resolves it)",
                participant=self.participant,
                gtrid=gtrid,
            ) from None

    async def abort(self, transaction: str, timeout: float, *, gtrid: str | None = None) -> None:
        """ABORT ``transaction`` and wait for the receipt; raises ParticipantError on failure."""
        await self.request(
            "ABORT", {"transaction": transaction}, timeout=timeout, what="ABORT", gtrid=gtrid
        )

    async def request(
        self,
        command: str,
        headers: dict[str, str],
        body: str = "",
        *,
        timeout: float | None = None,
        what: str,
        gtrid: str | None = None,
    ) -> None:
        """Send one frame; with a ``timeout``, wait for its receipt (BrokerRefused on ERROR)."""
        receipt_id, answer = await self._transmit(
            command, headers, body, gtrid, receipt=timeout is not None
        )
        if receipt_id is None or answer is None or timeout is None:
            return
        if self._corked is not None:  # an answer is awaited: what was kept must go now
            await self._uncork(gtrid)
        try:
            await self._wait(receipt_id, answer, timeout)
        except _Refused as exc:
            raise BrokerRefused(what, str(exc), participant=self.participant, gtrid=gtrid) from None
        except _NoAnswer as exc:
            raise self.unavailable(f"{what}: {exc}", gtrid) from None

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

    async def ack(self, message: Message, *, receipt_timeout: float | None = None) -> None:
        """ACK ``message`` (client and client-individual modes)."""
        await self.request("ACK", {"id": message.ack_id}, timeout=receipt_timeout, what="ACK")

    async def browse(
        self, destination: str, *, idle_timeout: float = 10.0, prefetch: int = 1000
    ) -> list[Message]:
        """The messages a browser may see on queue ``destination``, in queue order, unconsumed
        (cut short at the broker's ``maxBrowsePageSize``, as :meth:`StompClient.browse`)."""
        subscription = await self.subscribe(
            destination, prefetch=prefetch, headers={"browser": "true"}, timeout=idle_timeout
        )
        found: list[Message] = []
        while True:
            message = await subscription.get(idle_timeout)
            if message is None:
                raise self.unavailable(
                    f"the browse of {destination} stopped after {len(found)} messages: "
                    f"nothing came for {idle_timeout:g} s"
                )
            if message.is_browse_end:
                break
            found.append(message)
        self._subscriptions.pop(subscription.id, None)
        return found

    async def browse_complete(
        self, destination: str, *, idle_timeout: float = 10.0, receipt_timeout: float = 5.0
    ) -> list[Message]:
        """Every message on queue ``destination`` (sentinels left out); BrowseIncomplete if cut
        (a sentinel stored at the tail first, as :meth:`StompClient.browse_complete`)."""
        token = uuid.uuid4().hex
        await self.send(destination, "", {SENTINEL_HEADER: token}, receipt_timeout=receipt_timeout)
        found = await self.browse(destination, idle_timeout=idle_timeout)
        if not any(message.headers.get(SENTINEL_HEADER) == token for message in found):
            raise BrowseIncomplete(destination, len(found), participant=self.participant)
        return [message for message in found if not message.is_sentinel]

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
        except (TimeoutError, _NoAnswer):
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
    ) -> tuple[str | None, asyncio.Future[str | None] | None]:
        """Write one frame (or keep it, corked); its receipt id and the answer's future."""
        out = self._protocol.frame(command, headers, body, receipt=receipt, gtrid=gtrid)
        answer: asyncio.Future[str | None] | None = None
        if out.receipt_id is not None:
            answer = asyncio.get_running_loop().create_future()
            self._pending[out.receipt_id] = answer
        if self._corked is not None and self._corked_by is asyncio.current_task():
            self._corked.append(out.data)
            return out.receipt_id, answer
        try:
            await self._write(out.data, command, gtrid)
        except ParticipantUnavailable:
            if out.receipt_id is not None:
                self._give_up(out.receipt_id)
            raise
        return out.receipt_id, answer

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

    def _give_up(self, receipt_id: str) -> None:
        """Nobody waits for ``receipt_id`` any more."""
        self._pending.pop(receipt_id, None)
        self._protocol.forget(receipt_id)

    async def _wait(
        self, receipt_id: str, answer: asyncio.Future[str | None], timeout: float
    ) -> None:
        try:
            error = await asyncio.wait_for(asyncio.shield(answer), timeout)
        except TimeoutError:
            self._give_up(receipt_id)
            raise _NoAnswer(f"no answer came within {timeout:g} s") from None
        if error is not None:
            raise _Refused(error)

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
                answer.set_exception(_NoAnswer("the connection was lost before the answer came"))
        for subscription in self._subscriptions.values():
            subscription._lost()
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(_NoAnswer("the connection closed during CONNECT"))
