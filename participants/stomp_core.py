"""The STOMP 1.2 protocol of the last resource with no I/O: bytes in, events out (as h11).

:class:`StompProtocol` holds one connection's state and nothing else: it turns
the frames a client wants to send into bytes (headers escaped by
:mod:`participants.stomp_headers`, a receipt id when an answer is awaited), and
the bytes that arrive, cut anywhere, into events: the CONNECTED frame or the
ERROR that refused CONNECT, the answer (RECEIPT or ERROR) to a request whose
receipt is awaited, an ERROR that answers no request (a SEND without receipt:
counted, so that a COMMIT can refuse), a MESSAGE, a heart-beat. It keeps which
receipts are awaited, which transactions are open, the heart-beats agreed,
and where the connection stands. The blocking client
(:mod:`participants.stomp_client`) and the asyncio one
(:mod:`participants.aio.stomp`) only move bytes and wait.

Received bytes are cut and parsed by :class:`participants.stomp_frames.FrameReader`
(twopc's own STOMP 1.2 parser: escapes, content-length, CRLF, heart-beats),
for both clients; frames out are written by :func:`participants.stomp_frames.encode_frame`.
The errors both clients raise, with the words a user acts on, are here too.
"""

from __future__ import annotations

import enum
import itertools
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.errors import ConfigurationError, ParticipantError, ParticipantUnavailable
from participants.stomp_frames import (
    HEARTBEAT,
    FrameReader,
    MalformedFrame,
    ReceivedFrame,
    encode_frame,
)
from participants.stomp_headers import SENTINEL_HEADER as SENTINEL_HEADER
from participants.stomp_headers import frame_headers

#: What a user can do when the broker cannot be reached.
UNAVAILABLE_HINT = "run 'twopc lab up', or check TWOPC_STOMP"

#: What a user can do when the broker refuses the login.
LOGIN_HINT = (
    "set TWOPC_STOMP_USER and TWOPC_STOMP_PASSWORD to a user the broker knows "
    '(for the lab: eval "$(twopc lab env)")'
)

#: Destinations a SEND may name. ActiveMQ drops the whole connection for some
#: malformed names ("/queue/") and, worse, answers others with an ERROR while
#: the rest of the transaction still commits, so they are refused here.
DESTINATION_PREFIXES = ("/queue/", "/topic/")


def check_destination(destination: str) -> None:
    """ConfigurationError unless ``destination`` is ``/queue/<name>`` or ``/topic/<name>``."""
    if not destination.startswith(DESTINATION_PREFIXES) or destination.endswith("/"):
        raise ConfigurationError(
            f"STOMP destination {destination!r} must be /queue/<name> or /topic/<name>"
        )


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` into its parts; ConfigurationError if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigurationError(
            f"STOMP address {address!r} must be host:port, such as 127.0.0.1:61613 "
            "(set TWOPC_STOMP)"
        )
    return host, int(port)


# -- the errors ----------------------------------------------------------------------


class ClientIdInUse(ParticipantUnavailable):
    """The broker refused CONNECT: another live connection holds the same client-id."""

    def __init__(self, client_id: str, broker_message: str, *, participant: str) -> None:
        super().__init__(
            f"the broker refused client-id {client_id!r}: another connection still holds it "
            f"({broker_message})",
            participant=participant,
        )
        self.client_id = client_id


class BrokerSecurityError(ConfigurationError):
    """The broker refused our credentials or we refused its certificate: fix the settings.

    A ConfigurationError, not a ParticipantUnavailable: retrying cannot help.
    """

    def __init__(self, message: str, *, participant: str) -> None:
        super().__init__(f"{message} (participant {participant!r})")
        self.participant = participant


class BrokerLoginRefused(BrokerSecurityError):
    """The broker refused CONNECT's login and passcode (wrong, or missing)."""


class BrokerTlsRefused(BrokerSecurityError):
    """The TLS handshake failed: the broker's certificate is not trusted, or no TLS there."""


class BrokerRefused(ParticipantError):
    """The broker answered a request with an ERROR frame; carries the broker's message."""

    def __init__(
        self, what: str, broker_message: str, *, participant: str, gtrid: str | None = None
    ) -> None:
        super().__init__(
            f"the broker refused {what}: {broker_message}", participant=participant, gtrid=gtrid
        )
        self.broker_message = broker_message


#: A browse sentinel younger than this may belong to a browse still running (on any
#: coordinator sharing the queue): a sweep of a shared queue leaves it. Far above any
#: browse's idle timeout, and above the clock skew between hosts.
SENTINEL_LEFTOVER_AFTER = 300.0


def sentinel_token() -> str:
    """A new browse sentinel's token: its wall-clock time in ms, a dash, a random part."""
    return f"{time.time_ns() // 1_000_000}-{uuid.uuid4().hex}"


class BrowseIncomplete(ParticipantError):
    """The broker ended every browse tried before the end of the queue: its destination
    policy's maxBrowsePageSize, or the messages it holds in memory for the queue."""

    def __init__(self, destination: str, seen: int, *, participant: str, tries: int = 1) -> None:
        tried = "" if tries == 1 else f" (the last of {tries} browses, each with its sentinel)"
        super().__init__(
            f"the broker ended the browse of {destination} after {seen} messages, before the "
            f"end of the queue{tried}: its destination policy caps browsing "
            "(maxBrowsePageSize, 400 by default once a policyEntry matches the queue), and a "
            "browse sees only the messages the broker holds in memory for the queue (its "
            "memoryLimit). Raise maxBrowsePageSize above the queue's depth in activemq.xml "
            "('twopc doctor' checks it), or consume the queue down below what its memory "
            "holds",
            participant=participant,
        )
        self.destination = destination
        self.seen = seen


class NoAnswer(Exception):
    """No RECEIPT and no ERROR: timeout or connection lost. Internal: the clients word it."""


class Refused(Exception):
    """An ERROR frame answered the request. Internal: the clients word it."""


class StompProtocolError(ParticipantError):
    """The bytes from the broker are not STOMP, or a frame was asked for in the wrong state."""


def is_login_error(message: str, body: str) -> bool:
    """True for ActiveMQ's answer to a CONNECT with a wrong or missing login."""
    text = f"{message}\n{body}"
    return "SecurityException" in text or "password is invalid" in text


def login_refused(
    address: str, login: str | None, passcode: str | None, *, participant: str
) -> BrokerLoginRefused:
    """The error for a refused login: names the settings, never the password."""
    if login is None:
        what = "requires a login and none was given"
    elif not passcode:
        what = f"refused user {login!r} without a password"
    else:
        what = f"refused the login of user {login!r}: wrong user name or password"
    return BrokerLoginRefused(
        f"the STOMP broker at {address} {what}; {LOGIN_HINT}", participant=participant
    )


# -- messages and events -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One MESSAGE frame: its headers and its text body."""

    headers: Mapping[str, str]
    body: str

    @property
    def message_id(self) -> str:
        """The broker's message id."""
        return self.headers.get("message-id", "")

    @property
    def ack_id(self) -> str:
        """The id an ACK must name (STOMP 1.2 ``ack`` header; client ack modes only)."""
        return self.headers.get("ack", "")

    @property
    def is_sentinel(self) -> bool:
        """True for a message :meth:`StompClient.browse_complete` left on a queue."""
        return SENTINEL_HEADER in self.headers

    def sentinel_age(self, now: float) -> float | None:
        """Seconds since this browse sentinel was written (wall clock ``now``); None if
        it is no sentinel. A sentinel without its time (written by an older twopc) is
        infinitely old."""
        token = self.headers.get(SENTINEL_HEADER)
        if token is None:
            return None
        written, _, rest = token.partition("-")
        if not rest or not written.isdigit():
            return float("inf")
        return now - int(written) / 1000.0

    def is_leftover_sentinel(self, now: float) -> bool:
        """True for a browse sentinel older than :data:`SENTINEL_LEFTOVER_AFTER`: the
        browse that wrote it ended long ago, so a sweep of a shared queue may drop it."""
        age = self.sentinel_age(now)
        return age is not None and age > SENTINEL_LEFTOVER_AFTER

    @property
    def is_browse_end(self) -> bool:
        """True for the MESSAGE that ends an ActiveMQ browse."""
        return self.headers.get("browser") == "end"


@dataclass(frozen=True, slots=True)
class Connected:
    """CONNECTED: the connection is up, with the heart-beats agreed."""

    heartbeats: tuple[int, int]


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    """An ERROR answered CONNECT; ``error`` says why (client-id held, login, other)."""

    message: str
    body: str
    error: ParticipantError | ConfigurationError


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to a request whose receipt was awaited: RECEIPT (``error`` None) or ERROR."""

    receipt_id: str
    error: str | None


@dataclass(frozen=True, slots=True)
class UnansweredError:
    """An ERROR that answers no awaited request (a SEND without receipt, a late one)."""

    message: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A MESSAGE for subscription ``subscription``."""

    subscription: str
    message: Message


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """An end-of-line between frames: the broker is alive."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The broker closed the connection (end of stream)."""


Event = (
    Connected
    | ConnectRefused
    | Answer
    | UnansweredError
    | MessageReceived
    | Heartbeat
    | ConnectionClosed
)


class State(enum.Enum):
    """Where a connection stands."""

    IDLE = "idle"  # nothing sent yet
    CONNECTING = "connecting"  # CONNECT sent, no answer yet
    CONNECTED = "connected"
    CLOSED = "closed"  # refused, lost, or closed: nothing more is sent or read


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One frame to send: its bytes, and the receipt id to wait for (None: no answer awaited)."""

    data: bytes
    receipt_id: str | None


def encode(
    command: str,
    headers: Mapping[str, str],
    body: str = "",
    *,
    participant: str = "mq",
    gtrid: str | None = None,
) -> bytes:
    """One frame as bytes, its headers escaped as STOMP 1.2 wants
    (:func:`~participants.stomp_headers.frame_headers`); InvalidHeader if one cannot be."""
    escaped = frame_headers(command, headers, participant=participant, gtrid=gtrid)
    return encode_frame(command, escaped, body)


class StompProtocol:
    """One STOMP 1.2 connection's state, without I/O: frames to bytes and bytes to events."""

    def __init__(
        self,
        address: str,
        *,
        participant: str = "mq",
        client_id: str | None = None,
        login: str | None = None,
        passcode: str | None = None,
        heartbeats: tuple[int, int] = (0, 0),
    ) -> None:
        self.address = address
        self.participant = participant
        self.client_id = client_id
        self._login = login
        self._passcode = passcode
        self._heartbeats = heartbeats
        self.state = State.IDLE
        #: The heart-beats agreed in CONNECTED: (we send every, the broker sends every) ms.
        self.heartbeats = (0, 0)
        #: Transactions begun and not yet committed or aborted.
        self.transactions: set[str] = set()
        self._reader = FrameReader()
        self._ids = itertools.count(1)
        self._awaited: set[str] = set()
        self._unanswered: list[str] = []

    # -- what the connection knows -----------------------------------------------

    @property
    def error_count(self) -> int:
        """How many ERROR frames came that answered no request (a SEND without receipt)."""
        return len(self._unanswered)

    def errors_since(self, count: int) -> list[str]:
        """The messages of the unanswered ERROR frames after the first ``count``."""
        return self._unanswered[count:]

    def next_id(self, prefix: str) -> str:
        """A fresh id on this connection (subscriptions: ``sub-<n>``)."""
        return f"{prefix}-{next(self._ids)}"

    # -- frames out ----------------------------------------------------------------

    def connect(self) -> Outgoing:
        """The CONNECT frame (client-id, login); the connection is then CONNECTING."""
        if self.state is not State.IDLE:
            raise StompProtocolError(
                f"cannot CONNECT: the connection is {self.state.value}",
                participant=self.participant,
            )
        host, _ = parse_address(self.address)
        headers = {"accept-version": "1.2", "host": host}
        if self._heartbeats != (0, 0):
            headers["heart-beat"] = f"{self._heartbeats[0]},{self._heartbeats[1]}"
        if self.client_id:
            headers["client-id"] = self.client_id
        if self._login is not None:
            headers["login"] = self._login
            headers["passcode"] = self._passcode or ""
        self.state = State.CONNECTING
        return Outgoing(encode("CONNECT", headers, participant=self.participant), None)

    def frame(
        self,
        command: str,
        headers: Mapping[str, str],
        body: str = "",
        *,
        receipt: bool = False,
        gtrid: str | None = None,
    ) -> Outgoing:
        """The bytes of one frame; with ``receipt``, a ``receipt`` header whose answer is awaited.

        InvalidHeader (nothing recorded) if a header cannot be carried. BEGIN,
        COMMIT and ABORT keep :attr:`transactions` current.
        """
        sent = dict(headers)
        receipt_id = f"r-{next(self._ids)}" if receipt else None
        if receipt_id is not None:
            sent["receipt"] = receipt_id
        data = encode(command, sent, body, participant=self.participant, gtrid=gtrid)
        if receipt_id is not None:
            self._awaited.add(receipt_id)
        transaction = sent.get("transaction")
        if transaction is not None:
            if command == "BEGIN":
                self.transactions.add(transaction)
            elif command in ("COMMIT", "ABORT"):
                self.transactions.discard(transaction)
        return Outgoing(data, receipt_id)

    def heartbeat(self) -> bytes:
        """What to send when ``heartbeats[0]`` ms passed with nothing sent: one end-of-line."""
        return b"\n"

    def forget(self, receipt_id: str) -> None:
        """Its waiter gave up: an answer that still comes counts as an unanswered ERROR."""
        self._awaited.discard(receipt_id)

    def connection_lost(self) -> list[str]:
        """The connection ended: CLOSED; the receipts still awaited (they never come)."""
        self.state = State.CLOSED
        awaited, self._awaited = sorted(self._awaited), set()
        return awaited

    # -- bytes in ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """The events in ``data`` (any cut of the stream); ``b""`` is the end of the stream.

        StompProtocolError if the bytes are not STOMP 1.2 (the connection cannot go on).
        """
        if not data:
            self.connection_lost()
            return [ConnectionClosed()]
        reader = self._reader
        reader.feed(data)
        found: list[Event] = []
        while True:
            try:
                item = reader.next()
            except MalformedFrame as exc:
                raise StompProtocolError(
                    f"the broker at {self.address} sent bytes that are not STOMP 1.2: {exc}",
                    participant=self.participant,
                ) from None
            if item is None:
                return found
            if item is HEARTBEAT:
                found.append(Heartbeat())
                continue
            assert isinstance(item, ReceivedFrame)
            event = self.receive_frame(item)
            if event is not None:  # a RECEIPT nobody awaits any more says nothing
                found.append(event)

    def receive_frame(self, frame: ReceivedFrame) -> Event | None:
        """The event of one frame already cut and parsed; None if it concerns nobody."""
        headers = frame.headers
        command = frame.command
        if command == "MESSAGE":
            body = frame.body.decode(errors="replace")
            return MessageReceived(headers.get("subscription", ""), Message(headers, body))
        receipt_id = headers.get("receipt-id")
        if command == "RECEIPT":
            if receipt_id is None or receipt_id not in self._awaited:
                return None  # a waiter that gave up: nothing to say
            self._awaited.discard(receipt_id)
            return Answer(receipt_id, None)
        if command == "CONNECTED":
            self.state = State.CONNECTED
            self.heartbeats = self._agree(headers.get("heart-beat", "0,0"))
            return Connected(self.heartbeats)
        if command == "ERROR":
            body = frame.body.decode(errors="replace")
            message = headers.get("message") or body.split("\n", 1)[0]
            if self.state is State.CONNECTING:
                self.state = State.CLOSED  # ActiveMQ closes the socket after it
                return ConnectRefused(message, body, self._refusal(message, body))
            if receipt_id is not None and receipt_id in self._awaited:
                self._awaited.discard(receipt_id)
                return Answer(receipt_id, message)
            self._unanswered.append(message)
            return UnansweredError(message)
        raise StompProtocolError(
            f"the broker at {self.address} sent an unknown frame {command!r}",
            participant=self.participant,
        )

    def _agree(self, offered: str) -> tuple[int, int]:
        """STOMP 1.2 §heart-beating: each side at the larger of what one offers and the
        other wants, or not at all if either says 0."""
        try:
            broker_sends, broker_wants = (int(x) for x in offered.split(",", 1))
        except ValueError:
            return (0, 0)
        we_send, we_want = self._heartbeats
        send = max(we_send, broker_wants) if we_send and broker_wants else 0
        expect = max(we_want, broker_sends) if we_want and broker_sends else 0
        return (send, expect)

    def _refusal(self, message: str, body: str) -> ParticipantError | ConfigurationError:
        if "InvalidClientIDException" in body and self.client_id:
            return ClientIdInUse(self.client_id, message, participant=self.participant)
        if is_login_error(message, body):
            return login_refused(
                self.address, self._login, self._passcode, participant=self.participant
            )
        return BrokerRefused("CONNECT", message, participant=self.participant)
