"""ActiveMQ over STOMP as the last resource: transaction, commit marker, receipts, fencing.

STOMP has BEGIN/COMMIT/ABORT and no PREPARE, so the broker cannot vote: it
commits last and its COMMIT is the commit point. Inside the broker transaction
the coordinator SENDs a *commit marker* (header ``gtrid``) to the marker queue;
after a crash, a marker on the queue means "committed" (docs/design.md §5).

Group commit: a session keeps its SENDs until its commit point. Sessions that
reach it while another commit is running wait, and then share one broker
transaction (:meth:`AsyncActiveMQ._commit_members`): all their messages, one marker
whose ``gtrid`` header names every one of them (comma-separated), one COMMIT
and one RECEIPT. A single session commits at once, alone, as before.

Sessions live in a pool of long-lived STOMP connections. Slot ``i`` always
CONNECTs with client-id ``twopc-<coordinator id>-<i>``, and ActiveMQ refuses a
second live connection with a client-id it still holds: :meth:`AsyncActiveMQ.fence`
CONNECTs with the client-id of every slot a pool may have (``MAX_POOL_SIZE``),
and once it gets them all, the broker has finished with every frame a dead
session sent, so the marker queue is final.

BEGIN is sent at the commit point (or with a session's first ACK): a session
that sends nothing costs no frame at all, and aborting it sends nothing.

A session whose connection is in an unknown state (no answer in time, an
ERROR frame, a dropped socket, a simulated crash) is dropped when released,
never reused.

Each coordinator's markers go to a queue of its own (``/queue/twopc.markers.<id>``,
:func:`~participants.activemq_base.marker_queue_for`); the queue they all shared
before, ``/queue/twopc.markers``, is still read (and trimmed) by recovery for this
coordinator's markers until none is left there (docs/design.md §3).

Written once, for asyncio, in :mod:`participants.aio.activemq`;
``scripts/unasync.py`` generates the thread version, :mod:`participants.activemq`,
from it. The session is in ``mq_session``, the reading and trimming of
the marker queue in ``marker_queue``, the pool of sessions in ``session_pool``,
beside each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from coordinator import events
from coordinator.compat import ALock, asleep
from coordinator.errors import (
    CommitRefused,
    ConfigurationError,
    DuplicateGtrid,
    HeuristicMixed,
    InvalidTransition,
    OutcomeUnknown,
    ParticipantUnavailable,
)
from coordinator.protocol import AsyncLastResourceSession, LastResource
from coordinator.xid import validate_coordinator_id, validate_id
from participants import events as ev
from participants.activemq_base import (
    MARKER_HEADER,
    MARKER_QUEUE_PREFIX,
    MARKER_SEPARATOR,
    MAX_POOL_SIZE,
    SHARED_MARKER_QUEUE,
    CommitNotSent,
    FenceRefused,
    SessionState,
    client_id_for,
    marker_gtrids,
    marker_queue_for,
)
from participants.aio.group_commit import AsyncGroupCommit, Outcomes
from participants.aio.marker_queue import consume_markers, consume_own_markers, read_markers
from participants.aio.mq_session import AsyncActiveMQSession, Member, Slot, run_callbacks
from participants.aio.recovery_view import recovery_view
from participants.aio.session_pool import AsyncSessionPool
from participants.aio.stomp import AsyncStompClient, AsyncSubscription
from participants.stomp_client import ClientIdInUse, parse_address

__all__ = [
    "MARKER_HEADER",
    "MARKER_QUEUE_PREFIX",
    "MARKER_SEPARATOR",
    "MAX_POOL_SIZE",
    "SHARED_MARKER_QUEUE",
    "AsyncActiveMQ",
    "AsyncActiveMQSession",
    "CommitNotSent",
    "FenceRefused",
    "client_id_for",
    "marker_gtrids",
    "marker_queue_for",
]


class AsyncActiveMQ:
    """The ActiveMQ last resource: a pool of STOMP sessions with fixed client-ids."""

    def __init__(
        self,
        stomp_addr: str,
        coordinator_id: str,
        *,
        name: str = "mq",
        pool_size: int = 8,
        receipt_timeout: float = 5.0,
        marker_queue: str | None = None,
        shared_marker_queue: str | None = SHARED_MARKER_QUEUE,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 30.0,
        login: str | None = None,
        passcode: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
    ) -> None:
        """``login``/``passcode``: the broker's credentials (None: no login); ``tls``:
        connect over TLS, verifying the broker against ``ca_file`` (None: system CAs).
        ``marker_queue``: where this coordinator's markers go (by default its own,
        ``/queue/twopc.markers.<coordinator id>``); ``shared_marker_queue``: the queue
        every coordinator's markers went to before, read and trimmed for this
        coordinator's markers until none is left (None: never read).
        """
        if marker_queue is None:
            marker_queue = marker_queue_for(coordinator_id)
        parse_address(stomp_addr)
        validate_coordinator_id(coordinator_id)
        if not 1 <= pool_size <= MAX_POOL_SIZE:
            raise ConfigurationError(
                f"broker pool size must be between 1 and {MAX_POOL_SIZE}, not {pool_size}"
            )
        if not marker_queue.startswith("/queue/"):
            raise ConfigurationError(f"marker queue {marker_queue!r} must be a /queue/<name>")
        self.address = stomp_addr
        self.coordinator_id = coordinator_id
        self.receipt_timeout = receipt_timeout
        self.marker_queue = marker_queue
        self.shared_marker_queue = shared_marker_queue
        # What the shared queue held of this coordinator's markers when last read: None
        # (not read yet), True (some: the sweep trims it too) or False (none: it is never
        # written again, so it is not read again).
        self._shared_holds_ours: bool | None = None if shared_marker_queue else False
        self._name = name
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._login = login
        self._passcode = passcode
        self._tls = tls
        self._ca_file = ca_file
        self._slots = [Slot(i, client_id_for(coordinator_id, i)) for i in range(pool_size)]
        self._pool = AsyncSessionPool(self._slots, name)
        self._log: Any = events.get_logger(participant=name)
        #: Sessions reaching their commit point together share one broker transaction.
        self.group_commit: AsyncGroupCommit[Member] = AsyncGroupCommit(self._commit_members)
        self._kept_for_group: set[str] = set()  # ended, but their group's marker stays
        self._groups = ALock()  # guards _kept_for_group
        self._sweeping = ALock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def client_ids(self) -> list[str]:
        """Every client-id this coordinator's sessions connect with."""
        return [slot.client_id for slot in self._slots]

    async def begin(self, gtrid: str) -> AsyncActiveMQSession:
        """A session for ``gtrid`` (BEGIN goes out with its first frame). ParticipantUnavailable."""
        validate_id("gtrid", gtrid)
        async with self._groups:
            if gtrid in self._kept_for_group:
                raise DuplicateGtrid(
                    f"gtrid {gtrid} is still named by a commit marker on {self.marker_queue} "
                    "(its group commit's other transactions have not ended yet)"
                )
        slot = await self._pool.acquire(self._acquire_timeout, gtrid)
        try:
            client = await self._ready_client(slot)
        except BaseException:
            await self._pool.put_back(slot)
            raise
        return AsyncActiveMQSession(self, slot, client, gtrid)

    def lends_one(self) -> bool:
        """Whether exactly one session of the pool is lent (no other transaction of this
        coordinator holds one): a group commit could then carry nobody else."""
        return self._pool.lends_one()

    def recovery_broker(self) -> LastResource:
        """This broker as recovery and the backlog see it: a (sync) LastResource."""
        return recovery_view(self)

    # -- the commit point -------------------------------------------------------------

    async def commit_alone(self, member: Member) -> None:
        """Commit a session tied to its own connection (it ACKed a message) by itself."""
        outcome = (await self._commit_members([member]))[0]
        if outcome is not None:
            raise outcome

    async def _commit_members(self, members: Sequence[Member]) -> Outcomes:
        """One broker transaction for every member: their messages, one marker naming
        the gtrids that asked for one, one COMMIT and one RECEIPT; an outcome per member.

        The transaction runs on the first member's connection; the others' connections
        carried nothing. Its frames leave in one write, with the COMMIT. A refusal
        aborts every member, which is a correct outcome for each; no answer leaves
        every member in doubt, and its marker decides them all.
        """
        async with members[0].session._client.corked():
            return await self._commit_transaction(members)

    async def _commit_transaction(self, members: Sequence[Member]) -> Outcomes:
        carrier = members[0].session
        client = carrier._client
        txid = carrier.gtrid
        errors_before = carrier._errors_before  # what the carrier's connection sent since
        for member in members:
            member.session.committed_by = carrier._slot
            member.session.committed_on = client
        try:
            if not carrier._begun:
                await client.begin(txid, gtrid=txid)
                carrier._begun = True
            for member in members:
                session = member.session
                for destination, body, headers in session._outbox:
                    await client.send(
                        destination, body, headers, transaction=txid, gtrid=session.gtrid
                    )
                session._outbox = []
            marked = [m.session.gtrid for m in members if m.marker]
            if marked:
                await client.send(
                    self.marker_queue,
                    "",
                    {MARKER_HEADER: MARKER_SEPARATOR.join(marked)},
                    transaction=txid,
                    gtrid=txid,
                )
        except ParticipantUnavailable as exc:
            return self._end_members(
                members,
                SessionState.ABORTED,
                lambda gtrid: CommitNotSent(
                    f"the connection to the broker at {self.address} was lost before the "
                    "COMMIT was sent: nothing was committed",
                    participant=self.name,
                    gtrid=gtrid,
                ),
                cause=exc,
            )
        refused = client.errors_since(errors_before)
        if refused:
            await carrier.abort()
            return self._end_members(
                members,
                SessionState.ABORTED,
                lambda gtrid: CommitRefused(
                    f"the broker refused a frame of the transaction ({refused[0]}); "
                    "it was aborted instead of committed",
                    participant=self.name,
                    gtrid=gtrid,
                ),
            )
        for member in members:
            member.session._state = SessionState.COMMITTING
        crashed = run_callbacks(members, "before_commit")
        if crashed:  # a failpoint fired: that member's process "died" before the COMMIT
            carrier._state = SessionState.ACTIVE
            await carrier.abort()
            outcomes = self._end_members(
                [m for i, m in enumerate(members) if i not in crashed],
                SessionState.ABORTED,
                lambda gtrid: CommitNotSent(
                    "the group commit stopped before its COMMIT: nothing was committed",
                    participant=self.name,
                    gtrid=gtrid,
                ),
            )
            survivors = iter(outcomes)
            carrier._healthy = False
            return [crashed[i] if i in crashed else next(survivors) for i in range(len(members))]
        after: dict[int, BaseException] = {}
        try:
            await client.commit(
                txid,
                members[0].timeout,
                gtrid=txid,
                after_send=lambda: after.update(run_callbacks(members, "commit_sent")),
            )
        except (CommitRefused, OutcomeUnknown) as exc:  # each member gets one naming it
            kind, why = type(exc), exc.detail
            outcomes = self._end_members(
                members,
                SessionState.IN_DOUBT if isinstance(exc, OutcomeUnknown) else SessionState.ABORTED,
                lambda gtrid: kind(why, participant=self.name, gtrid=gtrid),
            )
        except ParticipantUnavailable as exc:
            outcomes = self._end_members(
                members,
                SessionState.ABORTED,
                lambda gtrid: CommitNotSent(
                    f"the connection to the broker at {self.address} was lost before the "
                    "whole COMMIT was sent: nothing was committed",
                    participant=self.name,
                    gtrid=gtrid,
                ),
                cause=exc,
            )
        else:
            outcomes = self._committed(members, client.errors_since(errors_before))
        return [after.get(i, outcome) for i, outcome in enumerate(outcomes)]

    def _committed(self, members: Sequence[Member], late: list[str]) -> Outcomes:
        """The RECEIPT came: every member is committed (heuristically, if an ERROR came late)."""
        for member in members:
            member.session._state = SessionState.COMMITTED
        if late:
            # An ERROR for a SEND without receipt arrived after the COMMIT had gone
            # out: the broker committed the transaction without that message.
            members[0].session._healthy = False
            return [
                HeuristicMixed(
                    f"the broker committed the transaction but refused a message in it ({late[0]})",
                    participant=self.name,
                    gtrid=m.session.gtrid,
                )
                for m in members
            ]
        for member in members:
            session = member.session
            if session._debug:
                session._log.debug(
                    ev.MQ_COMMITTED,
                    marker=member.marker,
                    messages=session._sent,
                    acks=session._acked,
                    group=len(members),
                )
        return [None] * len(members)

    def _end_members(
        self,
        members: Sequence[Member],
        state: SessionState,
        error: Callable[[str], BaseException],
        *,
        cause: BaseException | None = None,
    ) -> Outcomes:
        """Every member ends in ``state`` with its own copy of the error."""
        event = ev.MQ_COMMIT_UNKNOWN if state is SessionState.IN_DOUBT else ev.MQ_COMMIT_REFUSED
        outcomes: Outcomes = []
        for member in members:
            member.session._fail(state)
            exc = error(member.session.gtrid)
            exc.__cause__ = cause
            member.session._log.warning(event, error=str(exc), group=len(members))
            outcomes.append(exc)
        return outcomes

    # -- consuming, fencing, recovery ----------------------------------------------

    async def subscribe(self, destination: str, *, prefetch: int = 1) -> AsyncSubscription:
        """SUBSCRIBE (``client-individual``) on the connection of this broker's one session.

        For a coordinator that consumes inside its transactions: the pool must
        have a single session, so that every transaction's
        :meth:`AsyncActiveMQSession.ack` goes out on the connection the message
        was delivered on. If a session is dropped (its state unknown), the
        subscription reports the connection lost and the caller subscribes
        again; unacknowledged messages go back to the queue.
        """
        if len(self._slots) != 1:
            raise ConfigurationError(
                f"a consuming broker needs a pool of one session, not {len(self._slots)}: "
                "an ACK must go out on the connection its message was delivered on"
            )
        slot = await self._pool.acquire(self._acquire_timeout, f"subscribe to {destination}")
        try:
            client = await self._ready_client(slot)
            subscription = await client.subscribe(
                destination,
                ack="client-individual",
                prefetch=prefetch,
                timeout=self.receipt_timeout,
            )
        except BaseException:
            await self._release(slot, healthy=False)
            raise
        await self._pool.put_back(slot)
        return subscription

    async def fence(self, timeout: float) -> None:
        """CONNECT with every client-id of this coordinator, so no earlier COMMIT is in flight.

        Our own pooled connections are closed first (they hold client-ids);
        while the broker still holds one for a dead connection, CONNECT is
        retried until ``timeout``. All ``MAX_POOL_SIZE`` client-ids are taken
        over, whatever this pool's size; the pool keeps the connections of its
        own slots. FenceRefused if a live connection still holds a client-id.
        """
        deadline = time.monotonic() + timeout
        self._log.info(ev.MQ_FENCE_STARTED, client_ids=MAX_POOL_SIZE, timeout=timeout)
        slots = await self._pool.take_all(deadline)
        try:
            for slot in slots:
                if slot.client is not None:
                    await slot.client.close(self.receipt_timeout)
                    slot.client = None
            for index in range(MAX_POOL_SIZE):
                client_id = client_id_for(self.coordinator_id, index)
                try:
                    client = await self._connect(client_id, deadline - time.monotonic())
                except ClientIdInUse as exc:
                    self._log.warning(ev.MQ_FENCE_REFUSED, client_id=client_id, error=str(exc))
                    raise FenceRefused(client_id, timeout, participant=self.name) from exc
                if index < len(self._slots):
                    self._slots[index].client = client
                else:
                    await client.close(self.receipt_timeout)
        finally:
            for slot in slots:
                await self._pool.put_back(slot)
        self._log.info(ev.MQ_FENCE_DONE, client_ids=MAX_POOL_SIZE)

    async def settle(self, session: AsyncLastResourceSession, timeout: float) -> None:
        """Re-register the client-id of ``session``'s slot, so its last COMMIT is final.

        The session was dropped when its COMMIT got no answer; the broker keeps
        the dead connection's client-id until it has processed every frame that
        connection sent. Connecting with that client-id again proves it has.

        A slot already connected again since (the transaction that borrowed it next
        connected it) has proved it: settled at once, the slot left to its borrower.
        Waiting for that slot would wait for a transaction that may itself wait for
        the in-doubt transaction's row locks (docs/design.md §4, "The broker: client-id
        takeover").
        """
        if not isinstance(session, AsyncActiveMQSession):
            raise InvalidTransition(f"{session!r} is not a session of this broker")
        slot = session.committed_by
        if slot.client is not None and slot.client is not session.committed_on:
            return  # a CONNECT with the client-id was accepted after the COMMIT went out
        deadline = time.monotonic() + timeout
        await self._pool.take(slot, deadline, session.gtrid)  # lent to nobody else meanwhile
        try:
            if slot.client is None or not slot.client.alive:
                if slot.client is not None:
                    slot.client.drop()
                slot.client = await self._connect(slot.client_id, deadline - time.monotonic())
        except ClientIdInUse as exc:
            raise FenceRefused(slot.client_id, timeout, participant=self.name) from exc
        finally:
            await self._pool.put_back(slot)

    async def markers(self) -> set[str]:
        """The gtrids whose commit marker is on this coordinator's marker queue (a full
        browse, no selector), and those of its markers still on the shared queue.

        BrowseIncomplete if the broker cut a browse short (its maxBrowsePageSize):
        an incomplete list would make recovery roll back committed transactions.
        """
        async with await self._plain_client() as client:
            found = await read_markers(client, self.marker_queue, self.receipt_timeout)
            return found | await self._shared_markers(client)

    async def _shared_markers(self, client: AsyncStompClient) -> set[str]:
        """This coordinator's markers on the queue every coordinator shared before.

        Read until none is left: once a browse finds none, the browse sentinels it
        left there are dropped and the queue is not read again by this resource.
        """
        queue = self.shared_marker_queue
        if self._shared_holds_ours is False or queue is None:
            return set()
        prefix = f"{self.coordinator_id}."
        found = await read_markers(client, queue, self.receipt_timeout)
        ours = {g for g in found if g.startswith(prefix)}
        if not ours:
            await consume_markers(client, queue, set(), self.receipt_timeout)
        self._shared_holds_ours = bool(ours)
        return ours

    async def remove_markers(self, gtrids: Collection[str]) -> int:
        """Consume the markers of ``gtrids`` and leave every other marker; return how many
        of ``gtrids`` no longer have one.

        A group commit's marker goes only once every gtrid it names has been
        asked for: until then this resource keeps the gtrids asked so far, and
        a later call that completes the group removes it
        (:func:`~participants.aio.marker_queue.consume_own_markers`). This
        coordinator's markers still on the shared queue go too.
        """
        async with self._sweeping:  # one sweep at a time: each reads and rewrites the kept set
            async with self._groups:
                wanted = set(gtrids) | self._kept_for_group
            if not wanted:
                return 0
            async with await self._plain_client() as client:
                gone, kept = await consume_own_markers(
                    client, self.marker_queue, wanted, self.receipt_timeout
                )
                if self._shared_holds_ours and self.shared_marker_queue is not None:
                    shared_gone, shared_kept = await consume_markers(
                        client, self.shared_marker_queue, wanted - gone, self.receipt_timeout
                    )
                    gone |= shared_gone
                    kept = (kept | shared_kept) - gone
            async with self._groups:
                self._kept_for_group = kept
            self._log.info(ev.MQ_MARKERS_REMOVED, count=len(gone), asked=len(wanted))
            return len(gone)

    async def close(self) -> None:
        """Close the idle sessions; sessions still in use are dropped when released."""
        for slot in await self._pool.close():
            if slot.client is not None:
                await slot.client.close(self.receipt_timeout)
                slot.client = None

    # -- the pool (participants.aio.session_pool) ------------------------------

    async def _release(self, slot: Slot, *, healthy: bool) -> None:
        if (not healthy or self._pool.closed) and slot.client is not None:
            self._log.debug(ev.MQ_SESSION_DROPPED, client_id=slot.client_id, healthy=healthy)
            slot.client.drop()
            slot.client = None
        await self._pool.put_back(slot)

    async def _ready_client(self, slot: Slot) -> AsyncStompClient:
        """The slot's connection, reconnecting it if it was dropped or died while idle."""
        if slot.client is not None and slot.client.alive:
            return slot.client
        if slot.client is not None:
            slot.client.drop()
            slot.client = None
        slot.client = await self._connect(slot.client_id, self._connect_timeout)
        return slot.client

    async def _connect(self, client_id: str, timeout: float) -> AsyncStompClient:
        """CONNECT with ``client_id``, retrying until ``timeout`` while the broker still holds it.

        The broker keeps a dropped connection's client-id until it has processed
        every frame that connection sent: seconds, sometimes.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                client = await self._open(client_id)
            except ClientIdInUse as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                self._log.debug(ev.MQ_FENCE_RETRY, client_id=client_id, error=exc.args[0])
                await asleep(min(delay, remaining))
                delay = min(delay * 2, 0.5)
                continue
            self._log.debug(ev.MQ_CONNECTED, client_id=client_id, address=self.address)
            return client

    async def _plain_client(self) -> AsyncStompClient:
        """A connection without client-id, for reading and trimming the marker queue."""
        return await self._open(None)

    async def _open(self, client_id: str | None) -> AsyncStompClient:
        return await AsyncStompClient.open(
            self.address,
            participant=self.name,
            client_id=client_id,
            connect_timeout=self._connect_timeout,
            login=self._login,
            passcode=self._passcode,
            tls=self._tls,
            ca_file=self._ca_file,
        )
