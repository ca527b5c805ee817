"""One broker transaction of the ActiveMQ last resource: a session on a pooled connection.

SENDs are kept until the commit point, where the resource commits them in a
group commit (:meth:`~participants.aio.activemq.AsyncActiveMQ._commit_members`).
Written once, for asyncio; ``scripts/unasync.py`` generates the thread version,
:mod:`participants.mq_session`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator import events
from coordinator.errors import InvalidTransition, ParticipantError
from coordinator.protocol import no_callback
from participants import events as ev
from participants.activemq_base import SessionState
from participants.aio.group_commit import AsyncGroupCommit
from participants.aio.stomp import AsyncStompClient
from participants.stomp_client import check_destination
from participants.stomp_headers import InvalidMessage, message_headers


@dataclass
class Slot:
    """One place in the pool: a fixed client-id and, when connected, its connection."""

    index: int
    client_id: str
    client: AsyncStompClient | None = None


@dataclass
class Member:
    """One session's part in a group commit."""

    session: AsyncActiveMQSession
    timeout: float
    marker: bool
    before_commit: Callable[[], None]
    commit_sent: Callable[[], None]


def run_callbacks(members: Sequence[Member], which: str) -> dict[int, BaseException]:
    """Run each member's ``which`` callback; the exceptions they raised, by position."""
    raised: dict[int, BaseException] = {}
    for i, member in enumerate(members):
        try:
            getattr(member, which)()
        except BaseException as exc:  # a failpoint's simulated crash, for that member only
            raised[i] = exc
    return raised


class AsyncSessionHome(Protocol):
    """What a session needs of the broker whose pool it came from (AsyncActiveMQ)."""

    _log: Any
    receipt_timeout: float
    group_commit: AsyncGroupCommit[Member]

    @property
    def name(self) -> str: ...

    async def commit_alone(self, member: Member) -> None: ...

    def lends_one(self) -> bool: ...

    async def _release(self, slot: Slot, *, healthy: bool) -> None: ...


class AsyncActiveMQSession:
    """The broker transaction of one gtrid on one pooled connection (a LastResourceSession).

    SENDs are kept until the commit point: there they go out, with the marker,
    in the broker transaction of a group commit, which may carry the messages
    of other sessions committing at the same moment. A session that ACKs a
    delivered message must commit on the connection the message came on, so
    its first ACK sends its messages so far and from then on it works, and
    commits, alone on its own connection.
    """

    def __init__(
        self, resource: AsyncSessionHome, slot: Slot, client: AsyncStompClient, gtrid: str
    ) -> None:
        self._resource = resource
        self._slot = slot
        self._client = client
        self._gtrid = gtrid
        self._state = SessionState.ACTIVE
        self._begun = False
        self._solo = False  # True once an ACK tied the transaction to this connection
        self._outbox: list[tuple[str, str, dict[str, str]]] = []
        self._sent = 0
        self._acked = 0
        self._healthy = True
        self._errors_before = client.error_count
        self.committed_by: Slot = slot  # the slot whose COMMIT decided this session
        self.committed_on = client  # ... and the connection that carried that COMMIT
        self._log = resource._log.bind(gtrid=gtrid, slot=slot.index)
        self._debug = events.enabled(self._log)  # per-step events only when DEBUG passes

    @property
    def name(self) -> str:
        return self._resource.name

    @property
    def gtrid(self) -> str:
        """The global transaction this session belongs to (also the STOMP transaction id)."""
        return self._gtrid

    @property
    def has_work(self) -> bool:
        """True once a message was sent or acknowledged inside the transaction."""
        return self._sent + self._acked > 0

    async def send(
        self, destination: str, body: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """SEND a persistent message inside the transaction (it goes out at the commit point;
        no receipt: an ERROR for it refuses the COMMIT).

        The message carries the ``gtrid`` header and, when tracing is on, the
        current span's ``traceparent`` (coordinator.tracing), for its consumer.
        InvalidHeader (nothing kept, the transaction unchanged) for a header the
        protocol owns or a frame cannot carry (participants.stomp_headers).
        """
        self._require(SessionState.ACTIVE, "send")
        check_destination(destination)
        try:
            stamped = message_headers(
                destination, body, headers, gtrid=self._gtrid, participant=self.name
            )
        except InvalidMessage as exc:
            self._log.warning(ev.MQ_SEND_REFUSED, destination=destination, error=exc.detail)
            raise
        if self._solo:
            await self._transmit(destination, body, stamped)
        else:
            self._outbox.append((destination, body, stamped))
        self._sent += 1
        if self._debug:
            self._log.debug(ev.MQ_SENT, destination=destination)

    async def ack(self, ack_id: str) -> None:
        """ACK inside the transaction a message delivered on this session's connection
        (no receipt: an ERROR for it makes the COMMIT refuse, as for a SEND).

        ActiveMQ consumes the message only when the transaction commits; after an
        ABORT the message stays delivered to this connection, unacknowledged, and
        goes back to the queue when the connection closes (tests/test_consume_2pc.py).
        """
        self._require(SessionState.ACTIVE, "ack")
        try:
            await self._go_solo()
            await self._client.request(
                "ACK",
                {"id": ack_id, "transaction": self._gtrid},
                what=f"ACK of {ack_id}",
                gtrid=self._gtrid,
            )
        except ParticipantError:
            self._healthy = False
            raise
        self._acked += 1
        if self._debug:
            self._log.debug(ev.MQ_ACKED, ack_id=ack_id)

    async def send_ahead(self) -> None:
        """Phase 1 has begun: when no other session of the pool is lent (no group commit
        could carry this transaction with others), BEGIN and the messages kept so far
        go out now in one write, while the databases prepare, and the transaction
        commits alone on this connection: its commit point sends only the marker and
        the COMMIT (docs/design.md §2). Never raises: a connection lost here is lost
        for the commit point too, which then fails as not sent."""
        if self._solo or not self._outbox or self._state is not SessionState.ACTIVE:
            return
        if not self._resource.lends_one():
            return  # others are committing too: the group commit carries the messages
        try:
            async with self._client.corked():
                await self._go_solo()
        except ParticipantError:
            return  # marked unhealthy; the commit point meets the same connection
        if self._debug:
            self._log.debug(ev.MQ_SENT_AHEAD, messages=self._sent)

    async def commit_with_marker(
        self,
        gtrid: str,
        timeout: float,
        *,
        before_commit: Callable[[], None] = no_callback,
        commit_sent: Callable[[], None] = no_callback,
    ) -> None:
        """The commit point: SEND the messages and the marker, COMMIT, wait for the RECEIPT.

        CommitRefused: the broker answered with an ERROR (or the connection was
        lost before the COMMIT went out): nothing was committed. OutcomeUnknown:
        the COMMIT went out and no answer came within ``timeout``.
        ``before_commit`` runs once the marker is sent, ``commit_sent`` once the
        COMMIT frame is written (the receipt not yet seen).
        """
        if gtrid != self._gtrid:
            raise InvalidTransition(
                f"cannot commit the marker of {gtrid}: broker session {self._gtrid} is "
                f"{self._state.value}"
            )
        await self._commit(Member(self, timeout, True, before_commit, commit_sent))

    async def commit(self, timeout: float) -> None:
        """One-phase COMMIT, without marker; with nothing sent it sends nothing."""
        await self._commit(Member(self, timeout, False, no_callback, no_callback))

    async def abort(self) -> None:
        """ABORT the transaction (waiting for the receipt); never raises."""
        if self._state is not SessionState.ACTIVE:
            return
        self._state = SessionState.ABORTED
        self._outbox.clear()
        if not self._begun:
            return
        if not self._client.alive:
            self._healthy = False  # the broker rolls back a lost connection's transaction
            return
        try:
            await self._client.abort(self._gtrid, self._resource.receipt_timeout, gtrid=self._gtrid)
        except ParticipantError as exc:
            # Not aborted by us: the broker rolls it back when the connection is dropped.
            self._healthy = False
            self._log.warning(ev.MQ_ABORT_FAILED, error=str(exc))
            return
        if self._debug:
            self._log.debug(ev.MQ_ABORTED)

    async def release(self) -> None:
        """Return the connection to the pool, or drop it if its state is unknown. Never raises."""
        if self._state is SessionState.RELEASED:
            return
        if self._state is SessionState.ACTIVE:
            await self.abort()
        if self._state in (SessionState.COMMITTING, SessionState.IN_DOUBT):
            self._healthy = False
        self._state = SessionState.RELEASED
        await self._resource._release(self._slot, healthy=self._healthy)

    # -- the commit ------------------------------------------------------------------

    async def _commit(self, member: Member) -> None:
        self._require(SessionState.ACTIVE, "commit")
        if not member.marker and not self._begun and not self._outbox:
            self._state = SessionState.COMMITTED  # read-only: no transaction was ever begun
            return
        if self._solo:
            await self._resource.commit_alone(member)
        else:
            await self._resource.group_commit.submit(member)

    async def _go_solo(self) -> None:
        """Tie the transaction to this connection: BEGIN, then the messages kept so far."""
        if self._solo:
            return
        self._solo = True
        try:
            await self._client.begin(self._gtrid, gtrid=self._gtrid)
        except ParticipantError:
            self._healthy = False
            raise
        self._begun = True
        outbox, self._outbox = self._outbox, []
        for destination, body, headers in outbox:
            await self._transmit(destination, body, headers)

    async def _transmit(self, destination: str, body: str, headers: dict[str, str]) -> None:
        try:
            await self._client.send(
                destination, body, headers, transaction=self._gtrid, gtrid=self._gtrid
            )
        except ParticipantError:
            self._healthy = False
            raise

    def _fail(self, state: SessionState) -> None:
        self._state = state
        self._healthy = False

    def _require(self, state: SessionState, action: str) -> None:
        if self._state is not state:
            raise InvalidTransition(
                f"cannot {action}: broker transaction {self._gtrid} is {self._state.value}"
            )
