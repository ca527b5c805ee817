"""ActiveMQ as the asyncio last resource: the same transaction, marker, receipts and fencing.

The counterpart of :mod:`participants.activemq` on
:class:`~participants.aio.stomp.AsyncStompClient`: a pool of sessions with the
same fixed client-ids (``client_id_for``), BEGIN sent lazily with the first
frame, the commit marker on the same marker queue, and a session whose state
is unknown dropped when released. Recovery stays synchronous:
:meth:`AsyncActiveMQ.recovery_broker` is a :class:`~coordinator.protocol.LastResource`
that fences with the sync :class:`~participants.activemq.ActiveMQ` (after closing
this pool's idle sessions, so every client-id can be taken over) and reads and
trims the marker queue with it; it is called in a worker thread.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any, TypeVar

from coordinator import events
from coordinator.errors import (
    CommitRefused,
    ConfigurationError,
    HeuristicMixed,
    InvalidTransition,
    OutcomeUnknown,
    ParticipantError,
    ParticipantUnavailable,
)
from coordinator.protocol import AsyncLastResourceSession, LastResourceSession, no_callback
from coordinator.xid import validate_coordinator_id, validate_id
from participants import events as ev
from participants.activemq import (
    MARKER_QUEUE,
    MAX_POOL_SIZE,
    ActiveMQ,
    CommitNotSent,
    FenceRefused,
    client_id_for,
)
from participants.aio.stomp import AsyncStompClient
from participants.stomp_client import ClientIdInUse, check_destination, parse_address
from participants.stomp_headers import InvalidMessage, message_headers

T = TypeVar("T")


class _Slot:
    """One place in the pool: a fixed client-id and, when connected, its connection."""

    def __init__(self, index: int, client_id: str) -> None:
        self.index = index
        self.client_id = client_id
        self.client: AsyncStompClient | None = None


class _State(enum.Enum):
    ACTIVE = "active"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_DOUBT = "in doubt"
    RELEASED = "released"


class AsyncActiveMQSession:
    """The broker transaction of one gtrid on one pooled connection."""

    def __init__(
        self, resource: AsyncActiveMQ, slot: _Slot, client: AsyncStompClient, gtrid: str
    ) -> None:
        self._resource = resource
        self._slot = slot
        self._client = client
        self._gtrid = gtrid
        self._state = _State.ACTIVE
        self._begun = False
        self._sent = 0
        self._acked = 0
        self._healthy = True
        self._errors_before = client.error_count
        self._log = resource._log.bind(gtrid=gtrid, slot=slot.index)

    @property
    def name(self) -> str:
        return self._resource.name

    @property
    def gtrid(self) -> str:
        return self._gtrid

    @property
    def has_work(self) -> bool:
        return self._sent + self._acked > 0

    async def send(
        self, destination: str, body: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """SEND a persistent message inside the transaction (no receipt), with the ``gtrid``
        header and the trace context; InvalidHeader as :meth:`ActiveMQSession.send`.
        """
        self._require(_State.ACTIVE, "send")
        check_destination(destination)
        try:
            stamped = message_headers(
                destination, body, headers, gtrid=self._gtrid, participant=self.name
            )
        except InvalidMessage as exc:
            self._log.warning(ev.MQ_SEND_REFUSED, destination=destination, error=exc.detail)
            raise
        try:
            await self._begin_once()
            await self._client.send(
                destination, body, stamped, transaction=self._gtrid, gtrid=self._gtrid
            )
        except ParticipantError:
            self._healthy = False
            raise
        self._sent += 1
        self._log.debug(ev.MQ_SENT, destination=destination)

    async def ack(self, ack_id: str) -> None:
        """ACK inside the transaction a message delivered on this session's connection."""
        self._require(_State.ACTIVE, "ack")
        try:
            await self._begin_once()
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
        self._log.debug(ev.MQ_ACKED, ack_id=ack_id)

    async def commit_with_marker(
        self,
        gtrid: str,
        timeout: float,
        *,
        before_commit: Callable[[], None] = no_callback,
        commit_sent: Callable[[], None] = no_callback,
    ) -> None:
        """The commit point: SEND the marker, COMMIT, wait for the RECEIPT."""
        if gtrid != self._gtrid:
            raise InvalidTransition(
                f"cannot commit the marker of {gtrid}: broker session {self._gtrid} is "
                f"{self._state.value}"
            )
        await self._commit(
            timeout, marker=True, before_commit=before_commit, commit_sent=commit_sent
        )

    async def commit(self, timeout: float) -> None:
        """One-phase COMMIT, without marker; with nothing sent it sends nothing."""
        await self._commit(
            timeout, marker=False, before_commit=no_callback, commit_sent=no_callback
        )

    async def abort(self) -> None:
        """ABORT the transaction (waiting for the receipt); never raises."""
        if self._state is not _State.ACTIVE:
            return
        self._state = _State.ABORTED
        if not self._begun:
            return
        if not self._client.alive:
            self._healthy = False
            return
        try:
            await self._client.abort(self._gtrid, self._resource.receipt_timeout, gtrid=self._gtrid)
        except ParticipantError as exc:
            self._healthy = False
            self._log.warning(ev.MQ_ABORT_FAILED, error=str(exc))
            return
        self._log.debug(ev.MQ_ABORTED)

    async def release(self) -> None:
        """Return the connection to the pool, or drop it if its state is unknown."""
        if self._state is _State.RELEASED:
            return
        if self._state is _State.ACTIVE:
            await self.abort()
        if self._state in (_State.COMMITTING, _State.IN_DOUBT):
            self._healthy = False
        self._state = _State.RELEASED
        await self._resource._release(self._slot, healthy=self._healthy)

    async def _commit(
        self,
        timeout: float,
        *,
        marker: bool,
        before_commit: Callable[[], None],
        commit_sent: Callable[[], None],
    ) -> None:
        self._require(_State.ACTIVE, "commit")
        if not marker and not self._begun:
            self._state = _State.COMMITTED
            return
        try:
            await self._begin_once()
            if marker:
                await self._client.send(
                    self._resource.marker_queue,
                    "",
                    {"gtrid": self._gtrid},
                    transaction=self._gtrid,
                    gtrid=self._gtrid,
                )
        except ParticipantUnavailable as exc:
            self._fail(_State.ABORTED)
            raise CommitNotSent(
                f"the connection to the broker at {self._resource.address} was lost before "
                "the COMMIT was sent: nothing was committed",
                participant=self.name,
                gtrid=self._gtrid,
            ) from exc
        refused = self._client.errors_since(self._errors_before)
        if refused:
            await self.abort()
            self._fail(_State.ABORTED)
            raise CommitRefused(
                f"the broker refused a frame of the transaction ({refused[0]}); "
                "it was aborted instead of committed",
                participant=self.name,
                gtrid=self._gtrid,
            )
        self._state = _State.COMMITTING
        before_commit()
        try:
            await self._client.commit(
                self._gtrid, timeout, gtrid=self._gtrid, after_send=commit_sent
            )
        except CommitRefused as exc:
            self._fail(_State.ABORTED)
            self._log.warning(ev.MQ_COMMIT_REFUSED, error=str(exc))
            raise
        except OutcomeUnknown as exc:
            self._fail(_State.IN_DOUBT)
            self._log.warning(ev.MQ_COMMIT_UNKNOWN, error=str(exc))
            raise
        except ParticipantUnavailable as exc:
            self._fail(_State.ABORTED)
            raise CommitNotSent(
                f"the connection to the broker at {self._resource.address} was lost before "
                "the whole COMMIT was sent: nothing was committed",
                participant=self.name,
                gtrid=self._gtrid,
            ) from exc
        self._state = _State.COMMITTED
        late = self._client.errors_since(self._errors_before)
        if late:
            self._healthy = False
            raise HeuristicMixed(
                f"the broker committed the transaction but refused a message in it ({late[0]})",
                participant=self.name,
                gtrid=self._gtrid,
            )
        self._log.debug(ev.MQ_COMMITTED, marker=marker, messages=self._sent, acks=self._acked)

    async def _begin_once(self) -> None:
        if not self._begun:
            await self._client.begin(self._gtrid, gtrid=self._gtrid)
            self._begun = True

    def _fail(self, state: _State) -> None:
        self._state = state
        self._healthy = False

    def _require(self, state: _State, action: str) -> None:
        if self._state is not state:
            raise InvalidTransition(
                f"cannot {action}: broker transaction {self._gtrid} is {self._state.value}"
            )


class AsyncActiveMQ:
    """The ActiveMQ last resource for asyncio: a pool of sessions with fixed client-ids."""

    def __init__(
        self,
        stomp_addr: str,
        coordinator_id: str,
        *,
        name: str = "mq",
        pool_size: int = 8,
        receipt_timeout: float = 5.0,
        marker_queue: str = MARKER_QUEUE,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 30.0,
        login: str | None = None,
        passcode: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
    ) -> None:
        parse_address(stomp_addr)
        validate_coordinator_id(coordinator_id)
        if not 1 <= pool_size <= MAX_POOL_SIZE:
            raise ConfigurationError(
                f"broker pool size must be between 1 and {MAX_POOL_SIZE}, not {pool_size}"
            )
        self.address = stomp_addr
        self.coordinator_id = coordinator_id
        self.receipt_timeout = receipt_timeout
        self.marker_queue = marker_queue
        self._name = name
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._options: dict[str, Any] = {
            "login": login,
            "passcode": passcode,
            "tls": tls,
            "ca_file": ca_file,
        }
        # The sync resource over the same broker: reads and trims the marker queue for
        # recovery (its connections carry no client-id); it never begins a transaction.
        self._sync = self._sync_resource()
        self._slots = [_Slot(i, client_id_for(coordinator_id, i)) for i in range(pool_size)]
        self._free = list(reversed(self._slots))
        self._cond = asyncio.Condition()
        self._closed = False
        self._log: Any = events.get_logger(participant=name)

    @property
    def name(self) -> str:
        return self._name

    def _sync_resource(self) -> ActiveMQ:
        return ActiveMQ(
            self.address,
            self.coordinator_id,
            name=self._name,
            pool_size=1,
            receipt_timeout=self.receipt_timeout,
            marker_queue=self.marker_queue,
            connect_timeout=self._connect_timeout,
            **self._options,
        )

    async def begin(self, gtrid: str) -> AsyncActiveMQSession:
        """A session for ``gtrid`` (BEGIN goes out with its first frame)."""
        validate_id("gtrid", gtrid)
        slot = await self._acquire(gtrid)
        try:
            client = await self._ready_client(slot)
        except BaseException:
            await self._put_back(slot)
            raise
        return AsyncActiveMQSession(self, slot, client, gtrid)

    async def settle(self, session: AsyncLastResourceSession, timeout: float) -> None:
        """Re-register the client-id of ``session``'s slot, so its last COMMIT is final."""
        if not isinstance(session, AsyncActiveMQSession):
            raise InvalidTransition(f"{session!r} is not a session of this broker")
        slot = session._slot
        deadline = time.monotonic() + timeout
        async with self._cond:
            while slot not in self._free:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise ParticipantError(
                        f"cannot settle client-id {slot.client_id}: its slot stayed busy",
                        participant=self.name,
                        gtrid=session.gtrid,
                    )
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except TimeoutError:
                    continue
            self._free.remove(slot)
        try:
            if slot.client is None or not slot.client.alive:
                if slot.client is not None:
                    slot.client.drop()
                slot.client = await self._connect(slot.client_id, deadline - time.monotonic())
        except ClientIdInUse as exc:
            raise FenceRefused(slot.client_id, timeout, participant=self.name) from exc
        finally:
            await self._put_back(slot)

    def recovery_broker(self) -> _RecoveryBroker:
        return _RecoveryBroker(self, asyncio.get_running_loop())

    async def close_idle(self) -> None:
        """DISCONNECT every idle session (their client-ids become free)."""
        async with self._cond:
            idle = list(self._free)
        for slot in idle:
            if slot.client is not None:
                await slot.client.close(self.receipt_timeout)
                slot.client = None

    async def close(self) -> None:
        """Close the idle sessions; sessions still in use are dropped when released."""
        async with self._cond:
            self._closed = True
            idle, self._free = self._free, []
            self._cond.notify_all()
        for slot in idle:
            if slot.client is not None:
                await slot.client.close(self.receipt_timeout)
                slot.client = None
        await asyncio.to_thread(self._sync.close)

    # -- the pool --------------------------------------------------------------

    async def _acquire(self, gtrid: str) -> _Slot:
        deadline = time.monotonic() + self._acquire_timeout
        async with self._cond:
            while not self._free:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    why = (
                        "is closed"
                        if self._closed
                        else f"stayed busy for {self._acquire_timeout:g} s"
                    )
                    raise ParticipantUnavailable(
                        f"every one of the {len(self._slots)} broker sessions {why}",
                        participant=self.name,
                        gtrid=gtrid,
                    )
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except TimeoutError:
                    continue
            if self._closed:
                raise ParticipantUnavailable(
                    "the broker resource is closed", participant=self.name, gtrid=gtrid
                )
            return self._free.pop()

    async def _release(self, slot: _Slot, *, healthy: bool) -> None:
        if (not healthy or self._closed) and slot.client is not None:
            self._log.debug(ev.MQ_SESSION_DROPPED, client_id=slot.client_id, healthy=healthy)
            slot.client.drop()
            slot.client = None
        await self._put_back(slot)

    async def _put_back(self, slot: _Slot) -> None:
        async with self._cond:
            if not self._closed:
                self._free.append(slot)
            self._cond.notify()

    async def _ready_client(self, slot: _Slot) -> AsyncStompClient:
        if slot.client is not None and slot.client.alive:
            return slot.client
        if slot.client is not None:
            slot.client.drop()
            slot.client = None
        slot.client = await self._connect(slot.client_id, self._connect_timeout)
        return slot.client

    async def _connect(self, client_id: str, timeout: float) -> AsyncStompClient:
        """CONNECT with ``client_id``, retrying while the broker still holds it."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                client = await AsyncStompClient.open(
                    self.address,
                    participant=self.name,
                    client_id=client_id,
                    connect_timeout=self._connect_timeout,
                    **self._options,
                )
            except ClientIdInUse as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                self._log.debug(ev.MQ_FENCE_RETRY, client_id=client_id, error=exc.args[0])
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.5)
                continue
            self._log.debug(ev.MQ_CONNECTED, client_id=client_id, address=self.address)
            return client


class _RecoveryBroker:
    """An AsyncActiveMQ seen by recovery and the backlog (a sync LastResource).

    Called in a worker thread while the event loop runs: what touches the
    asyncio pool runs on the loop, the rest on the sync ActiveMQ.
    """

    def __init__(self, broker: AsyncActiveMQ, loop: asyncio.AbstractEventLoop) -> None:
        self._broker = broker
        self._loop = loop

    @property
    def name(self) -> str:
        return self._broker.name

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def begin(self, gtrid: str) -> LastResourceSession:
        raise InvalidTransition(
            f"cannot begin {gtrid} on recovery's view of broker {self.name!r}: "
            "transactions begin on the AsyncActiveMQ"
        )

    def fence(self, timeout: float) -> None:
        """Close the pool's idle sessions, then fence every client-id with the sync resource."""
        self._on_loop(self._broker.close_idle())
        fencer = self._broker._sync_resource()
        try:
            fencer.fence(timeout)
        finally:
            fencer.close()  # DISCONNECT: the pool's slots may take their client-ids again

    def settle(self, session: object, timeout: float) -> None:
        if not isinstance(session, AsyncActiveMQSession):
            raise InvalidTransition(f"{session!r} is not a session of broker {self.name!r}")
        self._on_loop(self._broker.settle(session, timeout))

    def markers(self) -> set[str]:
        return self._broker._sync.markers()

    def remove_markers(self, gtrids: Collection[str]) -> int:
        return self._broker._sync.remove_markers(gtrids)

    def close(self) -> None:
        """Nothing of its own to close: the AsyncActiveMQ closes the sync resource."""
