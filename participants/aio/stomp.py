"""An asyncio STOMP 1.2 connection for the last resource: the protocol core over streams.

The counterpart of :mod:`participants.stomp_client` for asyncio streams. What
STOMP says (frames and their escapes, receipts, which ERROR answers what, the
refusal of CONNECT, heart-beats) is :class:`~participants.stomp_core.StompProtocol`'s;
this module moves its bytes and waits: CONNECT (client-id, login, TLS,
TCP_NODELAY), BEGIN, SEND, ACK, COMMIT and ABORT with receipts awaited up to
a timeout, ERROR frames that answer no request counted so that a COMMIT can
refuse, corked writes (a transaction's frames in one write with its COMMIT),
subscriptions read with :meth:`AsyncSubscription.get`, and queue browses
(:meth:`AsyncStompClient.browse_complete`). All of that is written once, in
:class:`~participants.aio.stomp_ops.AsyncStompOperations` (the source of the
blocking client's base too); this module only opens the streams, writes,
reads in its receiver task and wakes the futures waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from dataclasses import dataclass

from participants import events as ev
from participants.aio.stomp_ops import AsyncStompOperations, AsyncSubscription, Waiter, _log
from participants.stomp_client import tls_context
from participants.stomp_core import (
    Connected,
    ConnectRefused,
    NoAnswer,
    Refused,
    StompProtocolError,
    encode,
    parse_address,
)

__all__ = ["AsyncStompClient", "AsyncSubscription", "encode"]

#: Bytes read at once from the stream.
READ_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Waiter:
    """An awaited receipt: its id and the future its answer settles."""

    receipt_id: str
    answer: asyncio.Future[str | None]


class AsyncStompClient(AsyncStompOperations):
    """One STOMP 1.2 connection over asyncio streams, opened by :meth:`open`."""

    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _connected: asyncio.Future[Connected | ConnectRefused] | None = None
    _receiver: asyncio.Task[None] | None = None

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

    def drop(self) -> None:
        """Close the socket now, without DISCONNECT (state unknown, or fencing). Never raises."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._receiver is not None and not self._receiver.done():
            self._receiver.cancel()
        self._on_lost()

    # -- the transport -------------------------------------------------------

    def _established(self) -> bool:
        return self._writer is not None

    async def _connect(self, timeout: float, tls: bool, ca_file: str | None) -> None:
        host, port = parse_address(self.address)
        context = tls_context(ca_file) if tls else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise self._cannot_connect(exc) from None
        sock = writer.get_extra_info("socket")
        try:
            if sock is not None:
                # Nagle's algorithm would hold a COMMIT behind the broker's delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # reset as it opened: the transport has let the socket go
            writer.close()
            raise self._closed_as_it_opened(str(exc)) from None
        self._reader, self._writer = reader, writer
        self._connected = asyncio.get_running_loop().create_future()
        self._receiver = asyncio.create_task(self._receive_loop())
        await self._write(self._protocol.connect().data, "CONNECT", None)
        try:
            answer = await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except (TimeoutError, NoAnswer):
            self.drop()
            raise self._no_connected(f"no CONNECTED frame within {timeout:g} s") from None
        if isinstance(answer, Connected):
            self._log_connected()
            return
        self.drop()
        raise answer.error

    def _waiter(self, receipt_id: str) -> _Waiter:
        return _Waiter(receipt_id, asyncio.get_running_loop().create_future())

    async def _flush(self, data: bytes, what: str, gtrid: str | None) -> None:
        await self._write(data, what, gtrid)

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

    async def _wait(self, waiter: Waiter, timeout: float) -> None:
        assert isinstance(waiter, _Waiter)
        try:
            error = await asyncio.wait_for(asyncio.shield(waiter.answer), timeout)
        except TimeoutError:
            self._give_up(waiter)
            raise NoAnswer(f"no answer came within {timeout:g} s") from None
        if error is not None:
            raise Refused(error)

    async def _peer_closed(self, timeout: float) -> None:
        if self._receiver is not None:
            await asyncio.wait({self._receiver}, timeout=timeout)

    async def _receive_loop(self) -> None:
        """The receiver task: bytes to the protocol core, its events to their waiters."""
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(READ_BYTES)
                self._receive(functools.partial(self._protocol.receive_data, data))
                if not data:
                    return
        except OSError:
            pass  # the connection is gone: its waiters learn it below
        except StompProtocolError as exc:
            _log().warning(ev.STOMP_ERROR, address=self.address, error=str(exc))
        finally:
            self._on_lost()

    # -- waking the waiters --------------------------------------------------

    def _connect_answered(self, event: Connected | ConnectRefused) -> None:
        if self._connected is not None and not self._connected.done():
            self._connected.set_result(event)

    def _answered(self, waiter: _Waiter, error: str | None) -> None:
        if not waiter.answer.done():
            waiter.answer.set_result(error)

    def _wake_lost(self, pending: list[_Waiter]) -> None:
        for waiter in pending:
            if not waiter.answer.done():
                waiter.answer.set_exception(
                    NoAnswer("the connection was lost before the answer came")
                )
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(NoAnswer("the connection closed during CONNECT"))
