"""The one place that opens blocking STOMP connections: receipts with timeouts, errors as
twopc errors.

What STOMP says -- frames and their escapes, receipt ids, which ERROR answers
which request, why CONNECT was refused -- is the protocol core's
(:class:`participants.stomp_core.StompProtocol`, shared with the asyncio client
:mod:`participants.aio.stomp`); the requests and the connection's state
(subscriptions, corked writes, receipts awaited, ERROR counts, closing) are
:class:`participants.stomp_ops.StompOperations`'s, generated from the asyncio
source. This module moves the frames over stomp.py's transport and receiver
thread, and wakes the threads waiting. The bytes that thread reads go
straight to the core, which cuts and parses them with twopc's own frame reader
(:mod:`participants.stomp_frames`), as the asyncio client's do: stomp.py
parses no frame and dispatches none to listeners but CONNECTED
(:func:`_read_into_core`). stomp.py has no safe way to wait:
its ``WaitingListener`` waits forever and ignores ERROR frames and
disconnects. :class:`StompClient` wraps one ``stomp.Connection12`` and adds
what the last resource, the outbox relays and the consumers need:

* TCP_NODELAY on the socket. stomp.py leaves Nagle's algorithm on, and a COMMIT
  sent right after a SEND then waits for the broker's delayed ACK: 45 ms per
  commit instead of about 1.5 ms.
* Receipts waited with a timeout. The RECEIPT, an ERROR frame answering the
  request (ActiveMQ copies the ``receipt`` into the ERROR's ``receipt-id``), or
  the connection dropping wakes the waiter; nothing waits forever.
* CONNECT with an optional ``login``/``passcode``. A broker that refuses them
  (ActiveMQ: ERROR "User name [...] or password is invalid.") is
  :class:`BrokerLoginRefused`, a ConfigurationError naming the settings to fix
  and never the password.
* TLS with ``tls=True``: the broker's certificate is verified against
  ``ca_file`` (else the system's trusted CAs) and its host name or IP address;
  a certificate that does not verify is :class:`BrokerTlsRefused`.
* CONNECT with an optional ``client-id``. ActiveMQ refuses a second live
  connection with the same client-id (``InvalidClientIDException``, then it
  closes the socket): that is :class:`ClientIdInUse`, the error fencing retries on.
* Subscriptions whose MESSAGE frames go to a queue (``Subscription.get``) or to a
  callback, acks, and queue browses. ActiveMQ browses with the SUBSCRIBE
  header ``browser:true`` and ends the browse with a MESSAGE carrying
  ``browser:end`` -- also when its ``maxBrowsePageSize`` (400 by default once a
  policyEntry matches the queue) cut the browse short, which
  :meth:`StompClient.browse_complete` detects. No selectors: a selector browse
  or a selector consumer misses messages deep in a queue (the broker pages a
  few hundred at a time).

Every SEND is ``persistent:true``; a non-persistent message is lost when the
broker is killed. Frames are written with their header names and values
escaped by :func:`participants.stomp_headers.frame_headers` (stomp.py escapes
values only), past stomp.py's ``send_frame``. Failures leave this module as
coordinator.errors types naming the participant and, when the caller passes
one, the gtrid.

The core's events are handled on stomp.py's receiver thread; their handlers
only record and signal, never block.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
import threading
from typing import Any

import stomp
from stomp.exception import NotConnectedException, StompException

from coordinator.errors import ConfigurationError
from participants import events as ev
from participants import stomp_log
from participants.stomp_core import (
    DESTINATION_PREFIXES,
    LOGIN_HINT,
    UNAVAILABLE_HINT,
    BrokerLoginRefused,
    BrokerRefused,
    BrokerSecurityError,
    BrokerTlsRefused,
    BrowseIncomplete,
    ClientIdInUse,
    Connected,
    ConnectRefused,
    Message,
    NoAnswer,
    Refused,
    StompProtocolError,
    check_destination,
    parse_address,
)
from participants.stomp_headers import SENTINEL_HEADER as SENTINEL_HEADER
from participants.stomp_ops import AckMode, StompOperations, Subscription, Waiter, _log

__all__ = [
    "DESTINATION_PREFIXES",
    "LOGIN_HINT",
    "SENTINEL_HEADER",
    "UNAVAILABLE_HINT",
    "AckMode",
    "BrokerLoginRefused",
    "BrokerRefused",
    "BrokerSecurityError",
    "BrokerTlsRefused",
    "BrowseIncomplete",
    "ClientIdInUse",
    "Message",
    "StompClient",
    "Subscription",
    "check_destination",
    "parse_address",
    "tls_context",
]

stomp_log.install()  # stomp.py logs CONNECT frames at DEBUG: never with the passcode

#: Bytes read at once from a TLS socket.
TLS_RECV_BYTES = 64 * 1024
#: How long drop() waits for stomp.py's receiver thread to close the socket it shut down.
RECEIVER_EXIT_WAIT = 2.0


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The client context stomp.py builds: verify the chain and the host name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    if ca_file:
        try:
            context.load_verify_locations(ca_file)
        except ssl.SSLError as exc:
            raise ConfigurationError(
                f"TWOPC_STOMP_CA={ca_file} holds no certificate in PEM ({exc.reason or exc}): "
                "set TWOPC_STOMP_CA to the broker's certificate in PEM (for the lab: "
                'eval "$(twopc lab env)")'
            ) from None
    else:
        context.load_default_certs()
    return context


def _tls_receive(transport: Any) -> bytes | None:
    """stomp.py's ``receive`` for a TLS socket, ending the receiver loop at end of stream.

    Over TLS stomp.py switches to non-blocking I/O and treats an empty read as
    "no data yet": it never notices that the broker closed the connection,
    and its loop spins on the readable socket. Here an empty read or a socket
    error stops that loop, which then reports the disconnect as it does for TCP.
    """
    sock = transport.socket
    if not isinstance(sock, ssl.SSLSocket) or transport.blocking:
        return transport.__class__.receive(transport)  # type: ignore[no-any-return]
    try:
        data: bytes = sock.recv(TLS_RECV_BYTES)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        raise  # no whole TLS record yet: stomp.py waits for the socket
    except OSError:
        data = b""
    if not data:
        transport.running = False
    return data


def _send_tls(transport: Any, data: bytes) -> None:
    """Write ``data`` (whole frames) to a TLS connection as stomp.py's ``transmit`` does:
    through its send queue, which its I/O thread writes.

    That thread reads the same TLS connection, and OpenSSL does not allow one
    connection to be read in one thread while another writes it. Written from
    the caller's thread, 1 to 3 opens in 100 on the lab failed with "the
    connection closed during CONNECT": the broker had received a record it
    could not decrypt ("Tag mismatch!" in its log) and closed the connection.
    (Over TCP the caller's thread writes, under stomp.py's socket lock.) While
    stomp.py closes the connection its transport is blocking again, and writes
    itself.
    """
    if transport.blocking:
        transport.send(data)
        return
    queue = transport.send_queue
    if queue is None:  # the I/O thread has stopped: the connection is closing
        raise NotConnectedException()
    queue.put(data)


#: What stomp.py's receiver loop is handed instead of the bytes the core read: one
#: end-of-line, which it takes for a heart-beat (a sign of life for its heart-beat listener).
_READ_BY_CORE = b"\n"


def _read_into_core(transport: Any, client: StompClient) -> None:
    """Make stomp.py's receiver thread hand every chunk it reads to ``client``'s core.

    The bytes go to ``StompProtocol.receive_data`` (the one path from bytes to
    events, shared with the asyncio client), and their events wake the waiters
    there, on the receiver thread. stomp.py sees one end-of-line per chunk, and
    once a CONNECTED frame built from the heart-beats the core agreed, so that
    its transport counts as connected and its heart-beat thread runs.

    The one place that relies on stomp.py's internals (stomp.py 9; checked by
    tests/test_stomp_transport.py, which fails if an upgrade changes them): its
    receiver loop reads through the transport's ``receive`` (an instance
    attribute wins over the method), takes a chunk that is exactly one
    end-of-line, read into an empty buffer, for a heart-beat without parsing
    anything, and takes an empty read for the end of the stream.
    """
    read = transport.receive  # stomp.py's, or _tls_receive over TLS

    def receive() -> bytes | None:
        data: bytes | None = read()
        if not data:
            return data  # end of stream, or (TLS) no whole record yet: stomp.py's to handle
        try:
            client._receive(functools.partial(client._protocol.receive_data, data))
        except StompProtocolError as exc:
            _log().warning(ev.STOMP_ERROR, address=client.address, error=str(exc))
            transport.running = False  # the stream cannot go on: end the receiver loop
            return b""
        agreed, client._agreed = client._agreed, None
        if agreed is not None:
            # stomp.py computes its heart-beats from the broker's offer and its own
            # request: offering what the core agreed, crossed, gives the same pair.
            return b"CONNECTED\nversion:1.2\nheart-beat:%d,%d\n\n\x00" % (agreed[1], agreed[0])
        return _READ_BY_CORE

    transport.receive = receive


class _Pending:
    """A receipt the broker owes us; set by the receiver thread."""

    __slots__ = ("done", "error", "lost", "receipt_id")

    def __init__(self, receipt_id: str) -> None:
        self.receipt_id = receipt_id
        self.done = threading.Event()
        self.error: str | None = None
        self.lost = False


class _Listener(stomp.ConnectionListener):  # type: ignore[misc]
    """Runs on stomp.py's receiver thread: the socket's opening and closing (the frames
    go to the core before stomp.py sees them: :func:`_read_into_core`)."""

    def __init__(self, client: StompClient) -> None:
        self.client = client

    def on_connecting(self, host_and_port: tuple[str, int]) -> None:
        self.client._set_nodelay()

    def on_connected(self, frame: Any) -> None:
        """stomp.py read the CONNECTED :func:`_read_into_core` handed it: CONNECT is done
        (stomp.py's transport and heart-beats are set up before the opener goes on)."""
        self.client._ready.set()

    def on_heartbeat(self) -> None:
        """Every chunk read reaches stomp.py as a heart-beat; the core has read it already."""

    def on_disconnected(self) -> None:
        self.client._closed_by_peer.set()
        self.client._on_lost()


class StompClient(StompOperations):
    """One STOMP 1.2 connection to the broker, opened by :meth:`open`."""

    def __init__(
        self,
        address: str,
        *,
        participant: str = "mq",
        client_id: str | None = None,
        heartbeats: tuple[int, int] = (0, 0),
        connect_timeout: float = 5.0,
        login: str | None = None,
        passcode: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
    ) -> None:
        """Prepare a connection (nothing is sent until :meth:`open` or ``_connect``).

        ``login``/``passcode``: the CONNECT credentials (None: no login).
        ``tls``: speak TLS to ``address``, verifying the broker's certificate
        against ``ca_file`` (None: the system's trusted CAs).
        """
        super().__init__(
            address,
            participant=participant,
            client_id=client_id,
            login=login,
            passcode=passcode,
            heartbeats=heartbeats,
        )
        self._host_port = parse_address(address)
        self._connect_timeout = connect_timeout
        self._login = login
        self._passcode = passcode
        self.tls = tls
        self._ca_file = ca_file
        self._conn: Any = stomp.Connection12(
            [self._host_port],
            reconnect_attempts_max=1,
            timeout=connect_timeout,
            heartbeats=heartbeats,
        )
        if tls:
            self._conn.transport.receive = functools.partial(_tls_receive, self._conn.transport)
            if ca_file is not None and not os.path.isfile(ca_file):
                raise ConfigurationError(
                    f"the certificate file to trust for the broker, {ca_file!r}, does not "
                    "exist: set TWOPC_STOMP_CA to the broker's certificate in PEM (for the "
                    'lab: eval "$(twopc lab env)")'
                )
            tls_context(ca_file)  # a file that is not PEM: ConfigurationError before connecting
            self._conn.set_ssl(for_hosts=[self._host_port], ca_certs=ca_file)
        self._agreed: tuple[int, int] | None = None  # CONNECTED read, not yet told stomp.py
        _read_into_core(self._conn.transport, self)
        self._conn.set_listener("twopc", _Listener(self))
        # Every write of ours, kept frames flushed included (stomp.py's heart-beats go
        # through its own transmit).
        transport = self._conn.transport
        self._write = functools.partial(_send_tls, transport) if tls else transport.send
        self._ready = threading.Event()  # CONNECTED, an ERROR instead, or the socket closed
        self._connected_ok = False
        self._connect_error: ConnectRefused | None = None
        self._closed_by_peer = threading.Event()  # stomp.py's receiver saw the socket close

    @classmethod
    def open(
        cls,
        address: str,
        *,
        participant: str = "mq",
        client_id: str | None = None,
        heartbeats: tuple[int, int] = (0, 0),
        connect_timeout: float = 5.0,
        login: str | None = None,
        passcode: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
    ) -> StompClient:
        """CONNECT to ``address``; ParticipantUnavailable (ClientIdInUse) if refused.

        BrokerLoginRefused if the broker refuses the login, BrokerTlsRefused if
        the TLS handshake fails.
        """
        client = cls(
            address,
            participant=participant,
            client_id=client_id,
            heartbeats=heartbeats,
            connect_timeout=connect_timeout,
            login=login,
            passcode=passcode,
            tls=tls,
            ca_file=ca_file,
        )
        client._connect()
        return client

    # -- state ---------------------------------------------------------------

    @property
    def tcp_socket(self) -> socket.socket | None:
        """The TCP socket (for diagnostics: tests read its options)."""
        sock: socket.socket | None = self._conn.transport.socket
        return sock

    def drop(self) -> None:
        """Close the socket now, without DISCONNECT (state unknown, or fencing). Never raises.

        While stomp.py's receiver thread runs, it alone closes the socket: a TLS
        shutdown here while it closes the same socket there aborts the process in
        OpenSSL (and a plain socket closed twice may close a reused descriptor).
        So a TCP shutdown, which touches no TLS state, ends its read, and it
        closes the socket and reports the disconnect; only without a running
        receiver is the socket closed here.
        """
        transport = self._conn.transport
        receiver = getattr(transport, "io_thread", None)
        try:
            if self._closed_by_peer.is_set() or transport.socket is None:
                pass
            elif (
                receiver is not None
                and receiver.is_alive()
                and receiver is not threading.current_thread()
            ):
                with contextlib.suppress(OSError):  # the peer may have closed it already
                    socket.socket.shutdown(transport.socket, socket.SHUT_RDWR)
                receiver.join(RECEIVER_EXIT_WAIT)
            else:
                transport.disconnect_socket()
        except Exception as exc:  # best effort: the connection is being thrown away
            _log().debug(ev.STOMP_DROP_FAILED, address=self.address, error=repr(exc))
        self._on_lost()

    # -- internals -----------------------------------------------------------

    def _connect(self) -> None:
        """Open the socket, send CONNECT, wait for CONNECTED; translate every failure."""
        try:
            self._conn.transport.start()
            with self._lock:
                connect = self._protocol.connect()
            self._write(connect.data)
        except StompProtocolError:  # the receiver read the reset first: no CONNECT to send
            self.drop()
            raise self._closed_as_it_opened("nothing was sent") from None
        except (StompException, OSError) as exc:
            self.drop()
            if self.tls:
                self._raise_tls_failure()
            # stomp.py logs the socket error and raises a bare ConnectFailedException.
            raise self._cannot_connect(exc) from None
        self._ready.wait(self._connect_timeout)
        if self._connect_error is not None:
            self._closed_by_peer.wait(1.0)  # ActiveMQ closes the socket after this ERROR
            self.drop()
            raise self._connect_error.error  # a held client-id, a refused login, other
        if not self.alive:
            self.drop()
            raise self._no_connected(
                f"no CONNECTED frame within {self._connect_timeout:g} s"
                if not self._lost
                else "the connection closed during CONNECT"
            )
        self._log_connected()

    def _raise_tls_failure(self) -> None:
        """Find out why the TLS connection failed (stomp.py only logs it) and raise that.

        Repeats the handshake with the same context on a socket of its own;
        returns when the reason is not TLS (the broker is not reachable at all).
        """
        host, port = self._host_port
        context = tls_context(self._ca_file)
        try:
            raw = socket.create_connection((host, port), timeout=self._connect_timeout)
        except OSError:
            return  # not a TLS problem: the broker cannot be reached
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            trusted = f"the certificate in {self._ca_file}" if self._ca_file else "the system CAs"
            raise BrokerTlsRefused(
                f"the STOMP broker at {self.address} presented a certificate that does not "
                f"verify against {trusted} ({exc.verify_message}); set TWOPC_STOMP_CA to the "
                "broker's certificate or the CA that signed it (the lab's is "
                "$TWOPC_HOME/activemq/broker-cert.pem)",
                participant=self.participant,
            ) from None
        except OSError as exc:  # ssl.SSLError, or the peer closed or reset the handshake
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise BrokerTlsRefused(
                f"the TLS handshake with the STOMP broker at {self.address} failed ({reason}); "
                "with TWOPC_STOMP_TLS=1, TWOPC_STOMP must be the broker's TLS connector (the "
                "lab's is TWOPC_STOMP_TLS_ADDRESS in 'twopc lab env')",
                participant=self.participant,
            ) from None
        finally:
            raw.close()

    def _set_nodelay(self) -> None:
        sock = self.tcp_socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _waiter(self, receipt_id: str) -> _Pending:
        return _Pending(receipt_id)

    def _wait(self, waiter: Waiter, timeout: float) -> None:
        assert isinstance(waiter, _Pending)
        if not waiter.done.wait(timeout):
            self._give_up(waiter)
            raise NoAnswer(f"no answer came within {timeout:g} s")
        if waiter.error is not None:
            raise Refused(waiter.error)
        if waiter.lost:
            raise NoAnswer("the connection was lost before the answer came")

    def _established(self) -> bool:
        return self._connected_ok

    def _flush(self, data: bytes, what: str, gtrid: str | None) -> None:
        if self._lost:
            raise self.unavailable(f"cannot send {what}: the connection is closed", gtrid)
        # Written by the core, its headers escaped (names too), past stomp.py's
        # send_frame and transmit, which would escape the values a second time and
        # write the frame again.
        try:
            self._write(data)
        except (StompException, OSError) as exc:
            self._on_lost()
            raise self.unavailable(
                f"connection lost while sending {what} ({type(exc).__name__})", gtrid
            ) from None

    def _peer_closed(self, timeout: float) -> None:
        """The DISCONNECT receipt came: the broker is done with the connection, and the
        drop() that follows ends it now (waiting for the broker to close it delays a
        process's exit)."""

    # -- called on the receiver thread (through _read_into_core) -------------

    def _connect_answered(self, event: Connected | ConnectRefused) -> None:
        if isinstance(event, Connected):
            self._agreed = event.heartbeats  # stomp.py is told next; _Listener then wakes us
            self._connected_ok = True
            return
        self._connect_error = event
        self._ready.set()

    def _answered(self, waiter: _Pending, error: str | None) -> None:
        waiter.error = error
        waiter.done.set()

    def _wake_lost(self, pending: list[_Pending]) -> None:
        for waiting in pending:
            waiting.lost = True
            waiting.done.set()
        self._ready.set()  # wakes a CONNECT still waiting
