# Generated from participants/aio/stomp_ops.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""The requests of a STOMP client, over a transport's few primitives: SEND, BEGIN, COMMIT,
ABORT, ACK, and queue browses, with their answers awaited and their failures worded.

The protocol core (:mod:`participants.stomp_core`) says what the frames are;
a transport (the blocking client of :mod:`participants.stomp_client`, the
asyncio one of :mod:`participants.aio.stomp`) writes them, reads the answers,
and provides what this class calls: ``_transmit`` (a frame out, kept if
corked, with a waiter when its receipt is awaited), ``_uncork``, ``_wait``,
``_give_up``, ``_read`` and ``_forget_subscription``. Written
once, for asyncio; ``scripts/unasync.py`` generates the thread version,
:mod:`participants.stomp_ops`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Protocol

from coordinator.errors import CommitRefused, OutcomeUnknown, ParticipantUnavailable
from participants.stomp_core import (
    SENTINEL_HEADER,
    UNAVAILABLE_HINT,
    BrokerRefused,
    BrowseIncomplete,
    Message,
    NoAnswer,
    Refused,
    check_destination,
)


class Waiter(Protocol):
    """A transport's handle on an awaited receipt."""

    @property
    def receipt_id(self) -> str: ...


class Reader(Protocol):
    """A transport's subscription, read one message at a time."""

    @property
    def id(self) -> str: ...

    def get(self, timeout: float) -> Message | None: ...


class StompOperations:
    """SEND, transactions, ACK and browses on a STOMP connection (a transport's base)."""

    address: str
    participant: str
    _corked: list[bytes] | None

    # -- what the transport provides -------------------------------------------------

    def _transmit(
        self,
        command: str,
        headers: Mapping[str, str],
        body: str,
        gtrid: str | None,
        *,
        receipt: bool = False,
    ) -> Waiter | None:
        raise NotImplementedError

    def _uncork(self, gtrid: str | None) -> None:
        raise NotImplementedError

    def _wait(self, waiter: Waiter, timeout: float) -> None:
        """Return once the RECEIPT came; NoAnswer (timeout, lost) or Refused (ERROR)."""
        raise NotImplementedError

    def _give_up(self, waiter: Waiter) -> None:
        raise NotImplementedError

    def _read(
        self, destination: str, *, prefetch: int, headers: Mapping[str, str], timeout: float
    ) -> Reader:
        """SUBSCRIBE for a browse."""
        raise NotImplementedError

    def _forget_subscription(self, sub_id: str) -> None:
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
        self, destination: str, *, idle_timeout: float = 10.0, receipt_timeout: float = 5.0
    ) -> list[Message]:
        """Every message on queue ``destination`` (sentinels left out); BrowseIncomplete if cut.

        A sentinel message is stored at the tail of the queue first: the browse
        is complete when it reaches that sentinel. Sentinels stay on the queue;
        every browse leaves them out, and whoever consumes the queue drops them.
        """
        token = uuid.uuid4().hex
        self.send(destination, "", {SENTINEL_HEADER: token}, receipt_timeout=receipt_timeout)
        found = self.browse(destination, idle_timeout=idle_timeout)
        if not any(message.headers.get(SENTINEL_HEADER) == token for message in found):
            raise BrowseIncomplete(destination, len(found), participant=self.participant)
        return [message for message in found if not message.is_sentinel]
