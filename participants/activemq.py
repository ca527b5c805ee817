"""ActiveMQ over STOMP as the last resource: transaction, commit marker, receipts, fencing.

STOMP has BEGIN/COMMIT/ABORT and no PREPARE, so the broker cannot vote: it
commits last and its COMMIT is the commit point. Inside the broker transaction
the coordinator SENDs a *commit marker* (header ``gtrid``) to the marker queue;
after a crash, a marker on the queue means "committed".

Group commit: a session keeps its SENDs until its commit point. Sessions that
reach it while another commit is running wait, and then share one broker
transaction (:meth:`ActiveMQ._commit_members`): all their messages, one marker
whose ``gtrid`` header names every one of them (comma-separated), one COMMIT
and one RECEIPT. A single session commits at once, alone, as before.

Sessions live in a pool of long-lived STOMP connections. Slot ``i`` always
CONNECTs with client-id ``twopc-<coordinator id>-<i>``, and ActiveMQ refuses a
second live connection with a client-id it still holds: :meth:`ActiveMQ.fence`
CONNECTs with the client-id of every slot a pool may have (``MAX_POOL_SIZE``),
and once it gets them all, the broker has finished with every frame a dead
session sent, so the marker queue is final.

BEGIN is sent at the commit point (or with a session's first ACK): a session
that sends nothing costs no frame at all, and aborting it sends nothing.

A session whose connection is in an unknown state (no answer in time, an
ERROR frame, a dropped socket, a simulated crash) is dropped when released,
never reused.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator import events
from coordinator.errors import (
    CommitRefused,
    ConfigurationError,
    DuplicateGtrid,
    HeuristicMixed,
    InvalidTransition,
    OutcomeUnknown,
    ParticipantError,
    ParticipantUnavailable,
)
from coordinator.protocol import LastResourceSession, no_callback
from coordinator.xid import validate_coordinator_id, validate_id
from participants import events as ev
from participants.group_commit import GroupCommit, Outcomes
from participants.stomp_client import (
    ClientIdInUse,
    Message,
    StompClient,
    Subscription,
    check_destination,
    parse_address,
)
from participants.stomp_headers import InvalidMessage, message_headers

MARKER_QUEUE = "/queue/twopc.markers"

#: The marker's header naming the gtrids it commits (several for a group commit).
MARKER_HEADER = "gtrid"
MARKER_SEPARATOR = ","


def marker_gtrids(headers: Mapping[str, str]) -> list[str]:
    """The gtrids a commit marker's headers name (a group commit names several)."""
    value = headers.get(MARKER_HEADER, "")
    return [gtrid for gtrid in value.split(MARKER_SEPARATOR) if gtrid]


def _run_callbacks(members: Sequence[_Member], which: str) -> dict[int, BaseException]:
    """Run each member's ``which`` callback; the exceptions they raised, by position."""
    raised: dict[int, BaseException] = {}
    for i, member in enumerate(members):
        try:
            getattr(member, which)()
        except BaseException as exc:  # a failpoint's simulated crash, for that member only
            raised[i] = exc
    return raised


#: The largest pool. fence() takes over this many client-ids whatever its own
#: pool size, so that recovery with a small pool still fences every session a
#: crashed coordinator with a large pool may have had.
MAX_POOL_SIZE = 64


class CommitNotSent(CommitRefused, ParticipantUnavailable):
    """The connection was lost before the COMMIT frame was written: nothing was committed."""


class FenceRefused(ParticipantError):
    """A live connection (a running or paused coordinator) still holds one of our client-ids."""

    def __init__(self, client_id: str, timeout: float, *, participant: str) -> None:
        super().__init__(
            f"client-id {client_id} is still held by a live connection after {timeout:g} s: "
            "a live coordinator (maybe paused) still holds it. Stop that coordinator (or let "
            "it finish) and run 'twopc recover' again",
            participant=participant,
        )
        self.client_id = client_id


def client_id_for(coordinator_id: str, slot: int) -> str:
    """The fixed client-id of pool slot ``slot`` of ``coordinator_id``."""
    return f"twopc-{coordinator_id}-{slot}"


@dataclass
class _Slot:
    """One place in the pool: a fixed client-id and, when connected, its connection."""

    index: int
    client_id: str
    client: StompClient | None = None


class _State(enum.Enum):
    ACTIVE = "active"
    COMMITTING = "committing"  # COMMIT about to be sent or sent, no answer yet
    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_DOUBT = "in doubt"
    RELEASED = "released"


@dataclass
class _Member:
    """One session's part in a group commit."""

    session: ActiveMQSession
    timeout: float
    marker: bool
    before_commit: Callable[[], None]
    commit_sent: Callable[[], None]


class ActiveMQSession:
    """The broker transaction of one gtrid on one pooled connection (a LastResourceSession).

    SENDs are kept until the commit point: there they go out, with the marker,
    in the broker transaction of a group commit (:meth:`ActiveMQ._commit_members`),
    which may carry the messages of other sessions committing at the same
    moment. A session that ACKs a delivered message must commit on the
    connection the message came on, so its first ACK sends its messages so far
    and from then on it works, and commits, alone on its own connection.
    """

    def __init__(self, resource: ActiveMQ, slot: _Slot, client: StompClient, gtrid: str) -> None:
        self._resource = resource
        self._slot = slot
        self._client = client
        self._gtrid = gtrid
        self._state = _State.ACTIVE
        self._begun = False
        self._solo = False  # True once an ACK tied the transaction to this connection
        self._outbox: list[tuple[str, str, dict[str, str]]] = []
        self._sent = 0
        self._acked = 0
        self._healthy = True
        self._errors_before = client.error_count
        self.committed_by: _Slot = slot  # the slot whose COMMIT decided this session
        self._log = resource._log.bind(gtrid=gtrid, slot=slot.index)

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

    def send(self, destination: str, body: str, headers: Mapping[str, str] | None = None) -> None:
        """SEND a persistent message inside the transaction (it goes out at the commit point;
        no receipt: an ERROR for it refuses the COMMIT).

        The message carries the ``gtrid`` header and, when tracing is on, the
        current span's ``traceparent`` (coordinator.tracing), for its consumer.
        InvalidHeader (nothing kept, the transaction unchanged) for a header the
        protocol owns or a frame cannot carry (participants.stomp_headers).
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
        if self._solo:
            self._transmit(destination, body, stamped)
        else:
            self._outbox.append((destination, body, stamped))
        self._sent += 1
        self._log.debug(ev.MQ_SENT, destination=destination)

    def ack(self, ack_id: str) -> None:
        """ACK inside the transaction a message delivered on this session's connection
        (no receipt: an ERROR for it makes the COMMIT refuse, as for a SEND).

        ActiveMQ consumes the message only when the transaction commits; after an
        ABORT the message stays delivered to this connection, unacknowledged, and
        goes back to the queue when the connection closes (tests/test_consume_2pc.py).
        """
        self._require(_State.ACTIVE, "ack")
        try:
            self._go_solo()
            self._client.request(
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

    def commit_with_marker(
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
        self._commit(_Member(self, timeout, True, before_commit, commit_sent))

    def commit(self, timeout: float) -> None:
        """One-phase COMMIT, without marker; with nothing sent it sends nothing."""
        self._commit(_Member(self, timeout, False, no_callback, no_callback))

    def abort(self) -> None:
        """ABORT the transaction (waiting for the receipt); never raises."""
        if self._state is not _State.ACTIVE:
            return
        self._state = _State.ABORTED
        self._outbox.clear()
        if not self._begun:
            return
        if not self._client.alive:
            self._healthy = False  # the broker rolls back a lost connection's transaction
            return
        try:
            self._client.abort(self._gtrid, self._resource.receipt_timeout, gtrid=self._gtrid)
        except ParticipantError as exc:
            # Not aborted by us: the broker rolls it back when the connection is dropped.
            self._healthy = False
            self._log.warning(ev.MQ_ABORT_FAILED, error=str(exc))
            return
        self._log.debug(ev.MQ_ABORTED)

    def release(self) -> None:
        """Return the connection to the pool, or drop it if its state is unknown. Never raises."""
        if self._state is _State.RELEASED:
            return
        if self._state is _State.ACTIVE:
            self.abort()
        if self._state in (_State.COMMITTING, _State.IN_DOUBT):
            self._healthy = False
        self._state = _State.RELEASED
        self._resource._release(self._slot, healthy=self._healthy)

    # -- the commit ------------------------------------------------------------------

    def _commit(self, member: _Member) -> None:
        self._require(_State.ACTIVE, "commit")
        if not member.marker and not self._begun and not self._outbox:
            self._state = _State.COMMITTED  # read-only: no transaction was ever begun
            return
        if self._solo:
            self._resource.commit_alone(member)
        else:
            self._resource.group_commit.submit(member)

    def _go_solo(self) -> None:
        """Tie the transaction to this connection: BEGIN, then the messages kept so far."""
        if self._solo:
            return
        self._solo = True
        try:
            self._client.begin(self._gtrid, gtrid=self._gtrid)
        except ParticipantError:
            self._healthy = False
            raise
        self._begun = True
        outbox, self._outbox = self._outbox, []
        for destination, body, headers in outbox:
            self._transmit(destination, body, headers)

    def _transmit(self, destination: str, body: str, headers: dict[str, str]) -> None:
        try:
            self._client.send(
                destination, body, headers, transaction=self._gtrid, gtrid=self._gtrid
            )
        except ParticipantError:
            self._healthy = False
            raise

    def _fail(self, state: _State) -> None:
        self._state = state
        self._healthy = False

    def _require(self, state: _State, action: str) -> None:
        if self._state is not state:
            raise InvalidTransition(
                f"cannot {action}: broker transaction {self._gtrid} is {self._state.value}"
            )


class ActiveMQ:
    """The ActiveMQ last resource: a pool of STOMP sessions with fixed client-ids."""

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
        """``login``/``passcode``: the broker's credentials (None: no login); ``tls``:
        connect over TLS, verifying the broker against ``ca_file`` (None: system CAs).
        """
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
        self._name = name
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._login = login
        self._passcode = passcode
        self._tls = tls
        self._ca_file = ca_file
        self._slots = [_Slot(i, client_id_for(coordinator_id, i)) for i in range(pool_size)]
        self._free = list(reversed(self._slots))  # a stack: warm low slots are reused first
        self._cond = threading.Condition()
        self._closed = False
        self._log: Any = events.get_logger(participant=name)
        #: Sessions reaching their commit point together share one broker transaction.
        self.group_commit: GroupCommit[_Member] = GroupCommit(self._commit_members)
        self._kept_for_group: set[str] = set()  # ended, but their group's marker stays
        self._sweeping = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def client_ids(self) -> list[str]:
        """Every client-id this coordinator's sessions connect with."""
        return [slot.client_id for slot in self._slots]

    def begin(self, gtrid: str) -> ActiveMQSession:
        """A session for ``gtrid`` (BEGIN goes out with its first frame). ParticipantUnavailable."""
        validate_id("gtrid", gtrid)
        with self._cond:
            if gtrid in self._kept_for_group:
                raise DuplicateGtrid(
                    f"gtrid {gtrid} is still named by a commit marker on {self.marker_queue} "
                    "(its group commit's other transactions have not ended yet)"
                )
        slot = self._acquire(gtrid)
        try:
            client = self._ready_client(slot)
        except BaseException:
            self._put_back(slot)
            raise
        return ActiveMQSession(self, slot, client, gtrid)

    # -- the commit point -------------------------------------------------------------

    def commit_alone(self, member: _Member) -> None:
        """Commit a session tied to its own connection (it ACKed a message) by itself."""
        outcome = self._commit_members([member])[0]
        if outcome is not None:
            raise outcome

    def _commit_members(self, members: Sequence[_Member]) -> Outcomes:
        """One broker transaction for every member: their messages, one marker naming
        the gtrids that asked for one, one COMMIT and one RECEIPT; an outcome per member.

        The transaction runs on the first member's connection; the others' connections
        carried nothing. Its frames leave in one write, with the COMMIT. A refusal
        aborts every member, which is a correct outcome for each; no answer leaves
        every member in doubt, and its marker decides them all.
        """
        with members[0].session._client.corked():
            return self._commit_transaction(members)

    def _commit_transaction(self, members: Sequence[_Member]) -> Outcomes:
        carrier = members[0].session
        client = carrier._client
        txid = carrier.gtrid
        errors_before = carrier._errors_before  # what the carrier's connection sent since
        for member in members:
            member.session.committed_by = carrier._slot
        try:
            if not carrier._begun:
                client.begin(txid, gtrid=txid)
                carrier._begun = True
            for member in members:
                session = member.session
                for destination, body, headers in session._outbox:
                    client.send(destination, body, headers, transaction=txid, gtrid=session.gtrid)
                session._outbox = []
            marked = [m.session.gtrid for m in members if m.marker]
            if marked:
                client.send(
                    self.marker_queue,
                    "",
                    {MARKER_HEADER: MARKER_SEPARATOR.join(marked)},
                    transaction=txid,
                    gtrid=txid,
                )
        except ParticipantUnavailable as exc:
            return self._end_members(
                members,
                _State.ABORTED,
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
            carrier.abort()
            return self._end_members(
                members,
                _State.ABORTED,
                lambda gtrid: CommitRefused(
                    f"the broker refused a frame of the transaction ({refused[0]}); "
                    "it was aborted instead of committed",
                    participant=self.name,
                    gtrid=gtrid,
                ),
            )
        for member in members:
            member.session._state = _State.COMMITTING
        crashed = _run_callbacks(members, "before_commit")
        if crashed:  # a failpoint fired: that member's process "died" before the COMMIT
            carrier._state = _State.ACTIVE
            carrier.abort()
            outcomes = self._end_members(
                [m for i, m in enumerate(members) if i not in crashed],
                _State.ABORTED,
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
            client.commit(
                txid,
                members[0].timeout,
                gtrid=txid,
                after_send=lambda: after.update(_run_callbacks(members, "commit_sent")),
            )
        except (CommitRefused, OutcomeUnknown) as exc:  # each member gets one naming it
            kind, why = type(exc), exc.detail
            outcomes = self._end_members(
                members,
                _State.IN_DOUBT if isinstance(exc, OutcomeUnknown) else _State.ABORTED,
                lambda gtrid: kind(why, participant=self.name, gtrid=gtrid),
            )
        except ParticipantUnavailable as exc:
            outcomes = self._end_members(
                members,
                _State.ABORTED,
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

    def _committed(self, members: Sequence[_Member], late: list[str]) -> Outcomes:
        """The RECEIPT came: every member is committed (heuristically, if an ERROR came late)."""
        for member in members:
            member.session._state = _State.COMMITTED
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
        members: Sequence[_Member],
        state: _State,
        error: Callable[[str], BaseException],
        *,
        cause: BaseException | None = None,
    ) -> Outcomes:
        """Every member ends in ``state`` with its own copy of the error."""
        event = ev.MQ_COMMIT_UNKNOWN if state is _State.IN_DOUBT else ev.MQ_COMMIT_REFUSED
        outcomes: Outcomes = []
        for member in members:
            member.session._fail(state)
            exc = error(member.session.gtrid)
            exc.__cause__ = cause
            member.session._log.warning(event, error=str(exc), group=len(members))
            outcomes.append(exc)
        return outcomes

    def subscribe(self, destination: str, *, prefetch: int = 1) -> Subscription:
        """SUBSCRIBE (``client-individual``) on the connection of this broker's one session.

        For a coordinator that consumes inside its transactions: the pool must
        have a single session, so that every transaction's :meth:`ActiveMQSession.ack`
        goes out on the connection the message was delivered on. If a session
        is dropped (its state unknown), the subscription reports the connection
        lost and the caller subscribes again; unacknowledged messages go back
        to the queue.
        """
        if len(self._slots) != 1:
            raise ConfigurationError(
                f"a consuming broker needs a pool of one session, not {len(self._slots)}: "
                "an ACK must go out on the connection its message was delivered on"
            )
        slot = self._acquire(f"subscribe to {destination}")
        try:
            client = self._ready_client(slot)
            subscription = client.subscribe(
                destination,
                ack="client-individual",
                prefetch=prefetch,
                timeout=self.receipt_timeout,
            )
        except BaseException:
            self._release(slot, healthy=False)
            raise
        self._put_back(slot)
        return subscription

    def fence(self, timeout: float) -> None:
        """CONNECT with every client-id of this coordinator, so no earlier COMMIT is in flight.

        Our own pooled connections are closed first (they hold client-ids);
        while the broker still holds one for a dead connection, CONNECT is
        retried until ``timeout``. All ``MAX_POOL_SIZE`` client-ids are taken
        over, whatever this pool's size; the pool keeps the connections of its
        own slots. FenceRefused if a live connection still holds a client-id.
        """
        deadline = time.monotonic() + timeout
        self._log.info(ev.MQ_FENCE_STARTED, client_ids=MAX_POOL_SIZE, timeout=timeout)
        slots = self._take_all(deadline)
        try:
            for slot in slots:
                if slot.client is not None:
                    slot.client.close(self.receipt_timeout)
                    slot.client = None
            for index in range(MAX_POOL_SIZE):
                client_id = client_id_for(self.coordinator_id, index)
                try:
                    client = self._connect(client_id, deadline - time.monotonic())
                except ClientIdInUse as exc:
                    self._log.warning(ev.MQ_FENCE_REFUSED, client_id=client_id, error=str(exc))
                    raise FenceRefused(client_id, timeout, participant=self.name) from exc
                if index < len(self._slots):
                    self._slots[index].client = client
                else:
                    client.close(self.receipt_timeout)
        finally:
            for slot in slots:
                self._put_back(slot)
        self._log.info(ev.MQ_FENCE_DONE, client_ids=MAX_POOL_SIZE)

    def settle(self, session: LastResourceSession, timeout: float) -> None:
        """Re-register the client-id of ``session``'s slot, so its last COMMIT is final.

        The session was dropped when its COMMIT got no answer; the broker keeps
        the dead connection's client-id until it has processed every frame that
        connection sent. Connecting with that client-id again proves it has.
        """
        if not isinstance(session, ActiveMQSession):
            raise InvalidTransition(f"{session!r} is not a session of this broker")
        slot = session.committed_by
        deadline = time.monotonic() + timeout
        with self._cond:
            while slot not in self._free:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise ParticipantError(
                        f"cannot settle client-id {slot.client_id}: its slot stayed busy",
                        participant=self.name,
                        gtrid=session.gtrid,
                    )
                self._cond.wait(remaining)
            self._free.remove(slot)
        try:
            if slot.client is None or not slot.client.alive:
                if slot.client is not None:
                    slot.client.drop()
                slot.client = self._connect(slot.client_id, deadline - time.monotonic())
        except ClientIdInUse as exc:
            raise FenceRefused(slot.client_id, timeout, participant=self.name) from exc
        finally:
            self._put_back(slot)

    def markers(self) -> set[str]:
        """The gtrids whose commit marker is on the marker queue (a full browse, no selector).

        BrowseIncomplete if the broker cut the browse short (its maxBrowsePageSize):
        an incomplete list would make recovery roll back committed transactions.
        """
        with self._plain_client() as client:
            found = client.browse_complete(
                self.marker_queue,
                idle_timeout=self.receipt_timeout,
                receipt_timeout=self.receipt_timeout,
            )
        return {gtrid for message in found for gtrid in marker_gtrids(message.headers)}

    def remove_markers(self, gtrids: Collection[str]) -> int:
        """Consume the markers of ``gtrids`` and leave every other marker; return how many
        of ``gtrids`` no longer have one.

        A browse says where the wanted markers sit; a client-individual
        subscription with a prefetch reaching the last of them receives them in
        queue order; only wanted ones (and browse sentinels) are ACKed; the
        UNSUBSCRIBE receipt proves the ACKs were processed, and the unacked
        markers go back to the queue. Markers beyond a browse the broker cut
        short stay for a later call. A group commit's marker goes only once every
        gtrid it names has been asked for: until then this resource keeps the
        gtrids asked so far, and a later call that completes the group removes it.
        """
        with self._sweeping:  # one sweep at a time: each reads and rewrites the kept set
            return self._remove_markers(set(gtrids))

    def _remove_markers(self, asked: set[str]) -> int:
        with self._cond:
            wanted = asked | self._kept_for_group
        if not wanted:
            return 0

        def removable(message: Message) -> bool:
            named = marker_gtrids(message.headers)
            return bool(named) and wanted.issuperset(named)

        with self._plain_client() as client:
            queued = client.browse(self.marker_queue, idle_timeout=self.receipt_timeout)
            kept = {g for m in queued if not removable(m) for g in marker_gtrids(m.headers)}
            positions = [i for i, m in enumerate(queued) if removable(m)]
            gone: set[str] = set()
            if positions:
                subscription = client.subscribe(
                    self.marker_queue,
                    ack="client-individual",
                    prefetch=positions[-1] + 1,
                    timeout=self.receipt_timeout,
                )
                removed = 0
                while removed < len(positions):
                    message = subscription.get(self.receipt_timeout)
                    if message is None:
                        break  # someone else consumed the rest meanwhile
                    if removable(message):
                        client.ack(message)
                        gone.update(marker_gtrids(message.headers))
                        removed += 1
                    elif message.is_sentinel:
                        client.ack(message)
                subscription.unsubscribe(timeout=self.receipt_timeout)
        with self._cond:
            self._kept_for_group = (wanted & kept) - gone
        self._log.info(ev.MQ_MARKERS_REMOVED, count=len(gone), asked=len(wanted))
        return len(gone)

    def close(self) -> None:
        """Close the idle sessions; sessions still in use are dropped when released."""
        with self._cond:
            self._closed = True
            idle, self._free = self._free, []
            self._cond.notify_all()
        for slot in idle:
            if slot.client is not None:
                slot.client.close(self.receipt_timeout)
                slot.client = None

    # -- the pool --------------------------------------------------------------

    def _acquire(self, gtrid: str) -> _Slot:
        deadline = time.monotonic() + self._acquire_timeout
        with self._cond:
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
                self._cond.wait(remaining)
            if self._closed:
                raise ParticipantUnavailable(
                    "the broker resource is closed", participant=self.name, gtrid=gtrid
                )
            return self._free.pop()

    def _take_all(self, deadline: float) -> list[_Slot]:
        with self._cond:
            while len(self._free) < len(self._slots):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    busy = sorted(set(self.client_ids) - {s.client_id for s in self._free})
                    raise ParticipantError(
                        f"cannot fence: broker sessions {', '.join(busy)} are in use by running "
                        "transactions of this process",
                        participant=self.name,
                    )
                self._cond.wait(remaining)
            taken, self._free = self._free, []
            return taken

    def _release(self, slot: _Slot, *, healthy: bool) -> None:
        if (not healthy or self._closed) and slot.client is not None:
            self._log.debug(ev.MQ_SESSION_DROPPED, client_id=slot.client_id, healthy=healthy)
            slot.client.drop()
            slot.client = None
        self._put_back(slot)

    def _put_back(self, slot: _Slot) -> None:
        with self._cond:
            if not self._closed:
                self._free.append(slot)
            self._cond.notify()

    def _ready_client(self, slot: _Slot) -> StompClient:
        """The slot's connection, reconnecting it if it was dropped or died while idle."""
        if slot.client is not None and slot.client.alive:
            return slot.client
        if slot.client is not None:
            slot.client.drop()
            slot.client = None
        slot.client = self._connect(slot.client_id, self._connect_timeout)
        return slot.client

    def _connect(self, client_id: str, timeout: float) -> StompClient:
        """CONNECT with ``client_id``, retrying until ``timeout`` while the broker still holds it.

        The broker keeps a dropped connection's client-id until it has processed
        every frame that connection sent: seconds, sometimes.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                client = self._open(client_id)
            except ClientIdInUse as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                self._log.debug(ev.MQ_FENCE_RETRY, client_id=client_id, error=exc.args[0])
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.5)
                continue
            self._log.debug(ev.MQ_CONNECTED, client_id=client_id, address=self.address)
            return client

    def _plain_client(self) -> StompClient:
        """A connection without client-id, for reading and trimming the marker queue."""
        return self._open(None)

    def _open(self, client_id: str | None) -> StompClient:
        return StompClient.open(
            self.address,
            participant=self.name,
            client_id=client_id,
            connect_timeout=self._connect_timeout,
            login=self._login,
            passcode=self._passcode,
            tls=self._tls,
            ca_file=self._ca_file,
        )
