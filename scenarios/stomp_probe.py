"""Whether a broker's STOMP connector leaves Nagle's algorithm on, seen from outside.

Two ABORT frames with receipts (of transactions just begun, so nothing changes
on the broker) go out in one write; the broker answers each with a RECEIPT,
written one after the other. With Nagle's algorithm on the broker's socket, the
second RECEIPT waits until this host acknowledges the first, which Linux delays
(40 ms or more); with ``transport.tcpNoDelay=true`` it follows at once. The gap
between the two receipts tells which (``twopc doctor``, scenarios.doctor).

The frames are made and read by the protocol core (participants.stomp_core)
over a plain socket, so that both go out in one write.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import ssl
import time

from coordinator.errors import ParticipantUnavailable
from participants.stomp_client import tls_context
from participants.stomp_core import (
    Answer,
    Connected,
    ConnectionClosed,
    ConnectRefused,
    Event,
    StompProtocol,
    parse_address,
)

PARTICIPANT = "doctor"


def receipt_gaps(
    address: str,
    *,
    pairs: int,
    login: str | None = None,
    passcode: str | None = None,
    tls: bool = False,
    ca_file: str | None = None,
    timeout: float = 5.0,
) -> list[float]:
    """For each of ``pairs`` pairs of receipt-requested frames written at once, the
    milliseconds between their receipts. ParticipantUnavailable if the broker cannot
    be reached or does not answer; the login's refusal as the broker words it."""
    protocol = StompProtocol(address, participant=PARTICIPANT, login=login, passcode=passcode)
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout)
        if tls:
            sock = tls_context(ca_file).wrap_socket(sock, server_hostname=host)
    except (OSError, ssl.SSLError) as exc:
        raise _unavailable(address, f"cannot connect: {exc}") from exc
    connection = _Connection(address, sock, protocol)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ours go out at once
        sock.sendall(protocol.connect().data)
        answer, _ = connection.next((Connected, ConnectRefused))
        if isinstance(answer, ConnectRefused):
            raise answer.error
        return [connection.gap() for _ in range(pairs)]
    except OSError as exc:
        raise _unavailable(address, str(exc)) from exc
    finally:
        with contextlib.suppress(OSError):
            sock.sendall(protocol.frame("DISCONNECT", {}).data)
        sock.close()


class _Connection:
    """A socket, the protocol core over it, and the events read but not yet looked at,
    each with the time its bytes arrived."""

    def __init__(self, address: str, sock: socket.socket, protocol: StompProtocol) -> None:
        self.address = address
        self.sock = sock
        self.protocol = protocol
        self.events: list[tuple[Event, float]] = []

    def gap(self) -> float:
        """One pair: BEGIN twice and ABORT twice with receipts, in one write; the ms
        between the two receipts' arrivals."""
        names = [f"twopc-doctor-{secrets.token_hex(4)}" for _ in range(2)]
        begins = [self.protocol.frame("BEGIN", {"transaction": name}) for name in names]
        aborts = [
            self.protocol.frame("ABORT", {"transaction": name}, receipt=True) for name in names
        ]
        self.sock.sendall(b"".join(frame.data for frame in (*begins, *aborts)))
        waiting = {frame.receipt_id for frame in aborts}
        arrived: list[float] = []
        while waiting:
            answer, at = self.next((Answer,))
            assert isinstance(answer, Answer)
            if answer.error is not None:
                raise _unavailable(self.address, f"the broker refused an ABORT: {answer.error}")
            if answer.receipt_id in waiting:
                waiting.discard(answer.receipt_id)
                arrived.append(at)
        return (arrived[-1] - arrived[0]) * 1000

    def next(self, kinds: tuple[type, ...]) -> tuple[Event, float]:
        """The next event of one of ``kinds`` (others are skipped) and when it arrived."""
        while True:
            while self.events:
                event, at = self.events.pop(0)
                if isinstance(event, ConnectionClosed):
                    raise _unavailable(self.address, "the broker closed the connection")
                if isinstance(event, kinds):
                    return event, at
            try:
                data = self.sock.recv(65536)
            except TimeoutError as exc:
                raise _unavailable(self.address, "no answer in time") from exc
            if not data:
                raise _unavailable(self.address, "the broker closed the connection")
            at = time.perf_counter()
            self.events += [(event, at) for event in self.protocol.receive_data(data)]


def _unavailable(address: str, detail: str) -> ParticipantUnavailable:
    return ParticipantUnavailable(f"the broker at {address}: {detail}", participant=PARTICIPANT)
