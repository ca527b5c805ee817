# Generated from participants/aio/stomp_ops.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""The requests of a STOMP client, over a transport's few primitives: SEND, BEGIN, COMMIT,
ABORT, ACK, and queue browses, with their answers awaited and their failures worded.

The protocol core (:mod:`participants.stomp_core`) says what the frames are;
a transport (the blocking client of :mod:`participants.stomp_client`, the
asyncio one of :mod:`participants.aio.stomp`) writes them, reads the answers,
and provides what this class calls (the end of the class): ``_transmit`` (a
frame out, kept if corked, with a waiter when its receipt is awaited),
``_flush`` (the kept frames in one write), ``_wait`` for a receipt, how CONNECT,
an answer and a dropped connection wake their waiters, and ``drop``.
Everything else about a connection is here: subscriptions and their queues,
corked writes, the receipts awaited, ERROR frames counted, closing, and what
the receiver does with each event of the core. Written once, for asyncio;
``scripts/unasync.py`` generates the thread version, :mod:`participants.stomp_ops`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, Self

from coordinator.compat import (
    Queue,
    StateLock,
    current_worker,
    queue_get,
    sleep,
)
from coordinator.errors import CommitRefused, OutcomeUnknown, ParticipantUnavailable
from coordinator.events import get_logger
from participants import events as ev
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
    NoAnswer,
    Refused,
    StompProtocol,
    UnansweredError,
    check_destination,
    sentinel_token,
)

AckMode = Literal["auto", "client-individual"]


def _log() -> Any:
    # Looked up at each use, so that the application's later structlog set-up applies.
    return get_logger(component="stomp")


class _ConnectionLost:
    """Queued to subscriptions when the connection drops."""


_LOST = _ConnectionLost()


class Waiter(Protocol):
    """A transport's handle on an awaited receipt."""

    @property
    def receipt_id(self) -> str: ...


class Subscription:
    """One SUBSCRIBE: MESSAGE frames arrive in a queue (``get``) unless a callback took them."""

    def __init__(
        self,
        client: StompOperations,
        sub_id: str,
        destination: str,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        self.client = client
        self.id = sub_id
        self.destination = destination
        self._on_message = on_message
        self._queue: Queue[Message | _ConnectionLost] = Queue()

    def get(self, timeout: float) -> Message | None:
        """The next message, or None after ``timeout`` seconds; ParticipantUnavailable if lost."""
        item = queue_get(self._queue, timeout)
        if isinstance(item, _ConnectionLost):
            self._queue.put_nowait(item)  # every later get() fails the same way
            raise self.client.unavailable(f"connection lost while reading {self.destination}")
        return item

    def unsubscribe(self, timeout: float | None = None) -> None:
        """UNSUBSCRIBE; with a ``timeout``, wait for the receipt (all earlier ACKs processed)."""
        self.client.request(
            "UNSUBSCRIBE", {"id": self.id}, timeout=timeout, what=f"UNSUBSCRIBE {self.destination}"
        )
        self.client._forget_subscription(self.id)

    def _deliver(self, message: Message) -> None:
        if self._on_message is None:
            self._queue.put_nowait(message)
            return
        try:
            self._on_message(message)
        except Exception as exc:
            # An exception escaping into the receiver would end it (and the connection).
            _log().error(ev.STOMP_CALLBACK_FAILED, destination=self.destination, error=repr(exc))

    def _lost(self) -> None:
        self._queue.put_nowait(_LOST)


class StompOperations:
    """A STOMP connection's state and requests (a transport's base): subscriptions, corked
    writes, receipts awaited, ERROR frames counted, closing; SEND, transactions, ACK and
    browses."""

    def __init__(
        self,
        address: str,
        *,
        participant: str,
        client_id: str | None,
        login: str | None = None,
        passcode: str | None = None,
        heartbeats: tuple[int, int] = (0, 0),
    ) -> None:
        self.address = address
        self.participant = participant
        self.client_id = client_id
        # What STOMP says (frames, receipts, errors, CONNECT's refusal) is the core's;
        # the transport moves the bytes (docs/design.md §5).
        self._protocol = StompProtocol(
            address,
            participant=participant,
            client_id=client_id,
            login=login,
            passcode=passcode,
            heartbeats=heartbeats,
        )
        # The core, the receipts awaited and the subscriptions, shared with the receiver.
        self._lock = StateLock()
        self._pending: dict[str, Any] = {}  # receipt id -> the transport's waiter
        self._subscriptions: dict[str, Subscription] = {}
        self._lost = False
        # Frames written while corked are kept and leave in one write (see corked()).
        self._corked: list[bytes] | None = None
        self._corked_by: object = None  # who corked: the task, or the thread

    # -- state -----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while the connection is up (an ERROR frame does not end it; a drop does)."""
        return self._established() and not self._lost

    @property
    def error_count(self) -> int:
        """How many ERROR frames came that answered no request (a SEND without receipt)."""
        with self._lock:
            return self._protocol.error_count

    def errors_since(self, count: int) -> list[str]:
        """The messages of the unanswered ERROR frames after the first ``count``."""
        with self._lock:
            return self._protocol.errors_since(count)

    # -- subscriptions and corked writes ---------------------------------------------

    def subscribe(
        self,
        destination: str,
        *,
        ack: AckMode = "auto",
        prefetch: int | None = None,
        selector: str | None = None,
        headers: Mapping[str, str] | None = None,
        on_message: Callable[[Message], None] | None = None,
        timeout: float | None = 5.0,
    ) -> Subscription:
        """SUBSCRIBE to ``destination``; waits for the receipt so a refusal raises here.

        ``prefetch`` is ActiveMQ's ``activemq.prefetchSize`` (how many unacked
        messages the broker pushes). ``on_message`` runs on the receiver and
        must not block (its exceptions are logged and dropped); without it,
        read with :meth:`Subscription.get`.
        """
        with self._lock:
            sub_id = self._protocol.next_id("sub")
        subscription = Subscription(self, sub_id, destination, on_message)
        frame_headers = dict(headers or {})
        frame_headers.update({"destination": destination, "id": sub_id, "ack": ack})
        if prefetch is not None:
            frame_headers["activemq.prefetchSize"] = str(prefetch)
        if selector is not None:
            frame_headers["selector"] = selector
        with self._lock:
            self._subscriptions[sub_id] = subscription
        try:
            self.request(
                "SUBSCRIBE", frame_headers, timeout=timeout, what=f"SUBSCRIBE to {destination}"
            )
        except BaseException:
            self._forget_subscription(sub_id)
            raise
        return subscription

    def _forget_subscription(self, sub_id: str) -> None:
        with self._lock:
            self._subscriptions.pop(sub_id, None)

    def _read(
        self, destination: str, *, prefetch: int, headers: Mapping[str, str], timeout: float
    ) -> Subscription:
        """SUBSCRIBE for a browse."""
        return self.subscribe(destination, prefetch=prefetch, headers=headers, timeout=timeout)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Keep the frames this task (thread) writes in the block, and send them in one
        write: with the next COMMIT (:meth:`commit`) or the next frame whose receipt is
        awaited, or when the block ends. If the block raises, the frames kept are
        dropped: none of them reached the broker.

        A transaction's BEGIN, SENDs, marker and COMMIT then cost one socket write
        and one TCP segment instead of one each.
        """
        self._corked, self._corked_by = [], current_worker()
        try:
            yield
        except BaseException:
            self._corked = self._corked_by = None
            raise
        self._uncork(None)

    def _keeps(self) -> bool:
        """True when a frame written now is kept: the writer corked."""
        return self._corked is not None and self._corked_by == current_worker()

    def _transmit(
        self,
        command: str,
        headers: Mapping[str, str],
        body: str,
        gtrid: str | None,
        *,
        receipt: bool = False,
    ) -> Waiter | None:
        """Write one frame, or keep it if this task (thread) corked; with ``receipt``, the
        waiter of its answer. InvalidHeader (nothing sent, nothing awaited) if a header
        cannot be carried.

        A frame is kept even once the connection is lost: the write that flushes
        the cork fails, in the step that sends it (a COMMIT's), so no frame is
        left over to fail the block's end instead.
        """
        with self._lock:
            out = self._protocol.frame(command, headers, body, receipt=receipt, gtrid=gtrid)
            waiter = None
            if out.receipt_id is not None:
                waiter = self._pending[out.receipt_id] = self._waiter(out.receipt_id)
        if self._keeps():
            assert self._corked is not None
            self._corked.append(out.data)
            return waiter
        try:
            self._flush(out.data, command, gtrid)
        except ParticipantUnavailable:
            if waiter is not None:
                self._give_up(waiter)
            raise
        return waiter

    def _uncork(self, gtrid: str | None) -> None:
        """Send the frames kept so far in one write (ParticipantUnavailable if it fails)."""
        kept, self._corked, self._corked_by = self._corked, None, None
        if not kept:
            return
        self._flush(b"".join(kept), f"{len(kept)} frames", gtrid)

    # -- closing ---------------------------------------------------------------------

    def close(self, timeout: float = 2.0) -> None:
        """DISCONNECT, wait up to ``timeout`` for its receipt, then close. Never raises."""
        if self.alive:
            with contextlib.suppress(Exception):
                self.request("DISCONNECT", {}, timeout=timeout, what="DISCONNECT")
                # ActiveMQ closes the socket after the receipt.
                self._peer_closed(timeout)
        self.drop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the receiver's side ---------------------------------------------------------

    def _give_up(self, waiter: Waiter) -> None:
        """Nobody waits for ``waiter`` any more: a late ERROR for it counts as unanswered."""
        with self._lock:
            self._pending.pop(waiter.receipt_id, None)
            self._protocol.forget(waiter.receipt_id)

    def _receive(self, read: Callable[[], Sequence[Event | None]]) -> None:
        """Events from the core (``read`` turns bytes or a frame into them, under the lock,
        with the receipts and subscriptions they concern): wake whom each concerns."""
        with self._lock:
            routed = [
                (
                    event,
                    self._pending.pop(event.receipt_id, None)
                    if isinstance(event, Answer)
                    else None,
                    self._subscriptions.get(event.subscription)
                    if isinstance(event, MessageReceived)
                    else None,
                )
                for event in read()
            ]
        for event, waiter, subscription in routed:
            if isinstance(event, Connected | ConnectRefused):
                self._connect_answered(event)
            elif isinstance(event, Answer) and waiter is not None:
                self._answered(waiter, event.error)
            elif isinstance(event, UnansweredError):
                _log().warning(ev.STOMP_ERROR, address=self.address, error=event.message)
            elif isinstance(event, MessageReceived) and subscription is not None:
                subscription._deliver(event.message)

    def _on_lost(self) -> None:
        """The connection is gone: every waiter and every subscription learns it, once."""
        with self._lock:
            if self._lost:
                return
            self._lost = True
            self._protocol.connection_lost()
            pending, self._pending = list(self._pending.values()), {}
            subscriptions = list(self._subscriptions.values())
        self._wake_lost(pending)
        for subscription in subscriptions:
            subscription._lost()

    # -- connecting ------------------------------------------------------------------

    def _cannot_connect(self, exc: BaseException) -> ParticipantUnavailable:
        """The socket could not be opened (or CONNECT written) to the broker."""
        return self.unavailable(f"cannot connect ({str(exc) or 'connection refused or timed out'})")

    def _closed_as_it_opened(self, detail: str) -> ParticipantUnavailable:
        """The broker's end reset the connection before CONNECT could go out."""
        return self.unavailable(
            f"cannot connect (the connection closed as soon as it opened: {detail})"
        )

    def _no_connected(self, reason: str) -> ParticipantUnavailable:
        """No CONNECTED came: a held client-id if the broker closed the socket, else ``reason``.

        ActiveMQ answers a held client-id with an ERROR and closes the socket; the
        close can win the race with the ERROR frame. Either way the id is not ours
        yet, and fencing may retry (it succeeds only on CONNECTED).
        """
        if self._lost and self.client_id:
            return ClientIdInUse(
                self.client_id,
                "the broker closed the connection during CONNECT",
                participant=self.participant,
            )
        return self.unavailable(reason)

    def _log_connected(self) -> None:
        _log().debug(ev.STOMP_CONNECTED, address=self.address, client_id=self.client_id)

    # -- what the transport provides -------------------------------------------------

    def _established(self) -> bool:
        """True once CONNECTED came on an open connection."""
        raise NotImplementedError

    def drop(self) -> None:
        """Close the socket now, without DISCONNECT (state unknown, or fencing). Never raises."""
        raise NotImplementedError

    def _peer_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the broker to close the connection."""
        raise NotImplementedError

    def _flush(self, data: bytes, what: str, gtrid: str | None) -> None:
        """Write ``data`` (one frame, or the frames kept) in one write; ParticipantUnavailable
        if it fails or the connection is lost already."""
        raise NotImplementedError

    def _connect_answered(self, event: Connected | ConnectRefused) -> None:
        """CONNECTED or its refusal came: wake the CONNECT waiting for it."""
        raise NotImplementedError

    def _answered(self, waiter: Any, error: str | None) -> None:
        """The RECEIPT (``error`` None) or ERROR answering ``waiter`` came: wake it."""
        raise NotImplementedError

    def _wake_lost(self, pending: list[Any]) -> None:
        """The connection dropped: wake the ``pending`` waiters and a CONNECT still waiting."""
        raise NotImplementedError

    def _waiter(self, receipt_id: str) -> Waiter:
        """A new waiter for the answer to receipt ``receipt_id`` (not yet registered)."""
        raise NotImplementedError

    def _wait(self, waiter: Waiter, timeout: float) -> None:
        """Return once the RECEIPT came; NoAnswer (timeout, lost) or Refused (ERROR)."""
        raise NotImplementedError

    # -- requests --------------------------------------------------------------------

    def unavailable(self, reason: str, gtrid: str | None = None) -> ParticipantUnavailable:
        return ParticipantUnavailable(
            f"STOMP broker at {self.address}: {reason}; {UNAVAILABLE_HINT}",
            participant=self.participant,
            gtrid=gtrid,
        )

    def send(
        self,
        destination: str,
        body: str,
        headers: Mapping[str, str] | None = None,
        *,
        transaction: str | None = None,
        receipt_timeout: float | None = None,
        gtrid: str | None = None,
    ) -> None:
        """SEND a persistent message, inside ``transaction`` if given.

        With ``receipt_timeout`` the broker's RECEIPT is awaited (the message
        is then stored); without it the SEND is fire-and-forget and an ERROR for
        it shows up only in ``errors_since``.
        """
        check_destination(destination)
        frame_headers = dict(headers or {})
        frame_headers["destination"] = destination
        frame_headers["persistent"] = "true"
        if transaction is not None:
            frame_headers["transaction"] = transaction
        if body:
            # stomp.py recomputes it from the encoded body; its presence is what counts.
            frame_headers["content-length"] = str(len(body))
        self.request(
            "SEND",
            frame_headers,
            body,
            timeout=receipt_timeout,
            what=f"SEND to {destination}",
            gtrid=gtrid,
        )

    def begin(self, transaction: str, *, gtrid: str | None = None) -> None:
        """BEGIN ``transaction`` (no receipt: an ERROR would fail the COMMIT anyway)."""
        self.request("BEGIN", {"transaction": transaction}, what="BEGIN", gtrid=gtrid)

    def commit(
        self,
        transaction: str,
        timeout: float,
        *,
        gtrid: str | None = None,
        after_send: Callable[[], None] | None = None,
    ) -> None:
        """COMMIT ``transaction`` and wait for the receipt; ``after_send`` runs in between.

        RECEIPT: committed. ERROR: CommitRefused, nothing was committed. No answer
        within ``timeout``, or the connection dropped after the COMMIT was written:
        OutcomeUnknown. If the COMMIT frame could not be written whole:
        ParticipantUnavailable (a broker never commits on a partial frame).
        """
        waiter = self._transmit("COMMIT", {"transaction": transaction}, "", gtrid, receipt=True)
        assert waiter is not None
        if self._corked is not None:
            try:
                self._uncork(gtrid)
            except ParticipantUnavailable:
                self._give_up(waiter)
                raise
        if after_send is not None:
            after_send()
        try:
            self._wait(waiter, timeout)
        except Refused as exc:
            raise CommitRefused(
                f"the broker refused the COMMIT: {exc}; nothing was committed",
                participant=self.participant,
                gtrid=gtrid,
            ) from None
        except NoAnswer as exc:
            raise OutcomeUnknown(
                f"COMMIT sent to the STOMP broker at {self.address}, but {exc}; whether it "
                "committed is known only after fencing ('twopc recover' resolves it)",
                participant=self.participant,
                gtrid=gtrid,
            ) from None

    def abort(self, transaction: str, timeout: float, *, gtrid: str | None = None) -> None:
        """ABORT ``transaction`` and wait for the receipt; raises ParticipantError on failure."""
        self.request(
            "ABORT", {"transaction": transaction}, timeout=timeout, what="ABORT", gtrid=gtrid
        )

    def request(
        self,
        command: str,
        headers: Mapping[str, str],
        body: str = "",
        *,
        timeout: float | None = None,
        what: str,
        gtrid: str | None = None,
    ) -> None:
        """Send one frame; with a ``timeout``, wait for its receipt.

        BrokerRefused if the broker answered with an ERROR; ParticipantUnavailable
        if the frame could not be written or no answer came (the connection's
        state is then unknown: drop it).
        """
        waiter = self._transmit(command, headers, body, gtrid, receipt=timeout is not None)
        if waiter is None or timeout is None:
            return
        if self._corked is not None:  # an answer is awaited: what was kept must go now
            self._uncork(gtrid)
        try:
            self._wait(waiter, timeout)
        except Refused as exc:
            raise BrokerRefused(what, str(exc), participant=self.participant, gtrid=gtrid) from None
        except NoAnswer as exc:
            raise self.unavailable(f"{what}: {exc}", gtrid) from None

    def ack(self, message: Message, *, receipt_timeout: float | None = None) -> None:
        """ACK ``message`` (client and client-individual modes)."""
        self.request("ACK", {"id": message.ack_id}, timeout=receipt_timeout, what="ACK")

    def browse(
        self, destination: str, *, idle_timeout: float = 10.0, prefetch: int = 1000
    ) -> list[Message]:
        """The messages a browser may see on queue ``destination``, in queue order, unconsumed.

        ActiveMQ ends a browse after the destination policy's ``maxBrowsePageSize``
        messages (400 by default once any policyEntry matches the queue) with the
        same ``browser:end`` as a finished one: when a missing message matters, use
        :meth:`browse_complete`. ParticipantUnavailable if nothing (not even the
        end of the browse) came for ``idle_timeout`` seconds.
        """
        subscription = self._read(
            destination, prefetch=prefetch, headers={"browser": "true"}, timeout=idle_timeout
        )
        found: list[Message] = []
        while True:
            message = subscription.get(idle_timeout)
            if message is None:
                raise self.unavailable(
                    f"the browse of {destination} stopped after {len(found)} messages: "
                    f"nothing came for {idle_timeout:g} s"
                )
            if message.is_browse_end:
                break
            found.append(message)
        self._forget_subscription(subscription.id)
        return found

    def browse_complete(
        self,
        destination: str,
        *,
        idle_timeout: float = 10.0,
        receipt_timeout: float = 5.0,
        tries: int = 3,
    ) -> list[Message]:
        """Every message on queue ``destination`` (sentinels left out); BrowseIncomplete if cut.

        A sentinel message is stored at the tail of the queue first: the browse
        is complete when it reaches that sentinel. Sentinels stay on the queue;
        every browse leaves them out, and a sweep of the queue drops those
        left over (:meth:`Message.is_leftover_sentinel`). A browse that missed
        its sentinel is tried again with a new one, ``tries`` in all: another
        coordinator's sweep holds the messages it receives until it
        unsubscribes, and a browse right after a restart may end before the
        broker paged the queue in.
        """
        for attempt in range(tries):
            if attempt:
                sleep(0.1 * attempt)
            token = sentinel_token()
            self.send(destination, "", {SENTINEL_HEADER: token}, receipt_timeout=receipt_timeout)
            found = self.browse(destination, idle_timeout=idle_timeout)
            if any(message.headers.get(SENTINEL_HEADER) == token for message in found):
                break
            _log().warning(
                ev.STOMP_BROWSE_RETRIED,
                destination=destination,
                seen=len(found),
                attempt=attempt + 1,
            )
        else:
            raise BrowseIncomplete(
                destination, len(found), participant=self.participant, tries=tries
            )
        return [message for message in found if not message.is_sentinel]
