"""The STOMP protocol core without sockets: frames cut anywhere, receipts, errors, heart-beats."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from participants.stomp_client import BrokerLoginRefused, BrokerRefused, ClientIdInUse
from participants.stomp_core import (
    SENTINEL_HEADER,
    SENTINEL_LEFTOVER_AFTER,
    Answer,
    Connected,
    ConnectionClosed,
    ConnectRefused,
    Heartbeat,
    Message,
    MessageReceived,
    State,
    StompProtocol,
    StompProtocolError,
    UnansweredError,
    sentinel_token,
)


def connected(**options: object) -> StompProtocol:
    protocol = StompProtocol("127.0.0.1:61613", **options)  # type: ignore[arg-type]
    protocol.connect()
    protocol.receive_data(b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\x00")
    return protocol


def frame(command: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = "".join(f"{name}:{value}\n" for name, value in headers.items())
    return f"{command}\n{lines}\n".encode() + body + b"\x00"


def test_connect_frame_carries_client_id_and_login_and_waits_for_connected() -> None:
    """CONNECT names the version, host, client-id and login; CONNECTED makes the state CONNECTED."""
    protocol = StompProtocol("broker:61613", client_id="twopc-c-0", login="u", passcode="p")
    data = protocol.connect().data
    assert data.startswith(b"CONNECT\n") and data.endswith(b"\x00")
    for line in (b"accept-version:1.2", b"host:broker", b"client-id:twopc-c-0", b"login:u"):
        assert line in data
    assert protocol.state is State.CONNECTING
    assert protocol.receive_data(b"CONNECTED\nversion:1.2\n\n\x00") == [Connected((0, 0))]
    assert protocol.state is State.CONNECTED
    with pytest.raises(StompProtocolError, match="connected"):
        protocol.connect()


def test_connected_split_at_every_byte_gives_one_event() -> None:
    """CONNECTED arriving cut at any byte gives exactly one Connected event."""
    data = b"CONNECTED\nversion:1.2\nserver:ActiveMQ\n\n\x00"
    for cut in range(1, len(data)):
        protocol = StompProtocol("h:1")
        protocol.connect()
        assert protocol.receive_data(data[:cut]) == []
        assert protocol.receive_data(data[cut:]) == [Connected((0, 0))]


STREAM_HEADERS = {"subscription": "sub-1", "message-id": "m-1", "ack": "a-1"}
BODY = "caf\u00e9 with a \x00 inside"


def stream(protocol: StompProtocol) -> tuple[bytes, list[object]]:
    """Frames a broker might send after CONNECT, and the events they must give."""
    ok = protocol.frame("SEND", {"destination": "/queue/q"}, "x", receipt=True).receipt_id
    refused = protocol.frame("ABORT", {"transaction": "t"}, receipt=True).receipt_id
    assert ok is not None and refused is not None
    body = BODY.encode()
    length = str(len(body))
    data = b"".join(
        [
            b"CONNECTED\nversion:1.2\n\n\x00",
            b"\n",
            frame("RECEIPT", {"receipt-id": ok}),
            b"\r\n",
            frame("ERROR", {"receipt-id": refused, "message": "no such transaction"}),
            frame("ERROR", {"message": "bad destination"}, b"details\n"),
            frame("MESSAGE", {**STREAM_HEADERS, "content-length": length}, body),
            frame("MESSAGE", {"subscription": "sub-2", "browser": "end"}),
        ]
    )
    events: list[object] = [
        Connected((0, 0)),
        Heartbeat(),
        Answer(ok, None),
        Heartbeat(),
        Answer(refused, "no such transaction"),
        UnansweredError("bad destination"),
        MessageReceived("sub-1", Message({**STREAM_HEADERS, "content-length": length}, BODY)),
        MessageReceived("sub-2", Message({"subscription": "sub-2", "browser": "end"}, "")),
    ]
    return data, events


def feed(protocol: StompProtocol, data: bytes, cuts: list[int]) -> list[object]:
    events: list[object] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events.extend(protocol.receive_data(data[start:cut]) if cut > start else [])
        start = cut
    return events


def test_a_stream_split_at_every_byte_gives_the_same_events() -> None:
    """Receipts, refusals, unanswered errors, messages and heart-beats: any two-piece cut,
    and one byte at a time, give the same events as the whole stream."""
    whole = StompProtocol("h:1")
    whole.connect()
    data, expected = stream(whole)
    assert whole.receive_data(data) == expected
    for cut in range(1, len(data)):
        protocol = StompProtocol("h:1")
        protocol.connect()
        stream(protocol)
        assert feed(protocol, data, [cut]) == expected, cut
    protocol = StompProtocol("h:1")
    protocol.connect()
    stream(protocol)
    assert feed(protocol, data, list(range(1, len(data)))) == expected


@given(st.lists(st.integers(min_value=1, max_value=400), max_size=30))
def test_a_stream_cut_anywhere_gives_the_same_events(cuts: list[int]) -> None:
    """Any number of cuts anywhere in the stream: the same events, in order."""
    protocol = StompProtocol("h:1")
    protocol.connect()
    data, expected = stream(protocol)
    assert feed(protocol, data, [c for c in cuts if c < len(data)]) == expected
    assert protocol.error_count == 1


def test_an_answer_nobody_awaits_is_counted_as_unanswered() -> None:
    """A waiter that gave up forgets its receipt: its RECEIPT says nothing, its ERROR counts."""
    protocol = connected()
    late = protocol.frame("BEGIN", {"transaction": "t"}, receipt=True).receipt_id
    gone = protocol.frame("BEGIN", {"transaction": "u"}, receipt=True).receipt_id
    assert late is not None and gone is not None and late != gone
    protocol.forget(late)
    protocol.forget(gone)
    assert protocol.receive_data(frame("RECEIPT", {"receipt-id": late})) == []
    refused = frame("ERROR", {"receipt-id": gone, "message": "late refusal"})
    assert protocol.receive_data(refused) == [UnansweredError("late refusal")]
    assert protocol.error_count == 1 and protocol.errors_since(0) == ["late refusal"]
    assert protocol.errors_since(1) == []


def test_errors_since_counts_only_the_later_unanswered_errors() -> None:
    """A COMMIT refuses on the ERRORs that came after its session began, not earlier ones."""
    protocol = connected()
    protocol.receive_data(frame("ERROR", {"message": "first"}))
    before = protocol.error_count
    protocol.receive_data(frame("ERROR", {"message": "second"}) + frame("ERROR", {}, b"third\n"))
    assert protocol.errors_since(before) == ["second", "third"]


@pytest.mark.parametrize(
    ("body", "message", "error"),
    [
        (
            "javax.jms.InvalidClientIDException: Broker: x",
            "Client already connected",
            ClientIdInUse,
        ),
        (
            "java.lang.SecurityException: User name [u] or password is invalid.",
            "",
            BrokerLoginRefused,
        ),
        ("something else", "refused", BrokerRefused),
    ],
)
def test_an_error_answering_connect_says_why(body: str, message: str, error: type) -> None:
    """An ERROR before CONNECTED: a held client-id, a refused login, or another refusal."""
    protocol = StompProtocol("h:1", client_id="twopc-c-0", login="u", passcode="secret")
    protocol.connect()
    [event] = protocol.receive_data(frame("ERROR", {"message": message}, body.encode()))
    assert isinstance(event, ConnectRefused) and isinstance(event.error, error)
    assert "secret" not in str(event.error)
    assert protocol.state is State.CLOSED


def test_connection_lost_returns_the_receipts_still_awaited() -> None:
    """The end of the stream closes the connection; the receipts awaited will never come."""
    protocol = connected()
    first = protocol.frame("COMMIT", {"transaction": "t"}, receipt=True).receipt_id
    protocol.frame("SEND", {"destination": "/queue/q"}, "x")
    assert protocol.receive_data(b"") == [ConnectionClosed()]
    assert protocol.state is State.CLOSED
    assert protocol.connection_lost() == []
    other = connected()
    second = other.frame("COMMIT", {"transaction": "t"}, receipt=True).receipt_id
    assert other.connection_lost() == [second] and first is not None


def test_transactions_are_open_from_begin_to_commit_or_abort() -> None:
    """BEGIN opens a transaction; COMMIT and ABORT close it."""
    protocol = connected()
    protocol.frame("BEGIN", {"transaction": "a"})
    protocol.frame("BEGIN", {"transaction": "b"})
    protocol.frame("SEND", {"destination": "/queue/q", "transaction": "a"}, "x")
    assert protocol.transactions == {"a", "b"}
    protocol.frame("COMMIT", {"transaction": "a"}, receipt=True)
    protocol.frame("ABORT", {"transaction": "b"})
    assert protocol.transactions == set()


@pytest.mark.parametrize(
    ("ours", "theirs", "agreed"),
    [
        ((0, 0), "1000,1000", (0, 0)),
        ((500, 2000), "1000,1000", (1000, 2000)),
        ((500, 0), "0,0", (0, 0)),
    ],
)
def test_heartbeats_are_agreed_as_stomp_says(
    ours: tuple[int, int], theirs: str, agreed: tuple[int, int]
) -> None:
    """Each direction beats at the larger of the offer and the wish, or not if either is 0."""
    protocol = StompProtocol("h:1", heartbeats=ours)
    data = protocol.connect().data
    assert (b"heart-beat:" in data) == (ours != (0, 0))
    [event] = protocol.receive_data(frame("CONNECTED", {"version": "1.2", "heart-beat": theirs}))
    assert event == Connected(agreed) and protocol.heartbeats == agreed
    assert protocol.heartbeat() == b"\n"


def test_headers_are_escaped_out_and_unescaped_in() -> None:
    """A header value with a colon and a newline leaves escaped and comes back whole."""
    protocol = connected()
    data = protocol.frame("SEND", {"destination": "/queue/q", "note": "a:b\nc"}, "x").data
    assert b"note:a\\cb\\nc\n" in data
    message = frame("MESSAGE", {"subscription": "s", "note": "a\\cb\\nc"})
    [event] = protocol.receive_data(message)
    assert isinstance(event, MessageReceived) and event.message.headers["note"] == "a:b\nc"


def test_a_body_longer_than_its_content_length_is_a_protocol_error() -> None:
    """A frame that does not end where its content-length says is refused, not guessed at."""
    protocol = connected()
    with pytest.raises(StompProtocolError, match="content-length"):
        protocol.receive_data(frame("MESSAGE", {"content-length": "2"}, b"abc"))


def test_a_browse_sentinel_is_left_over_only_once_older_than_any_browse() -> None:
    """A sentinel's token carries its time: young ones stay, old and timeless ones are left over."""
    token = sentinel_token()
    written = int(token.partition("-")[0]) / 1000.0
    young = Message({SENTINEL_HEADER: token}, "")
    assert young.sentinel_age(written + 1.0) == pytest.approx(1.0)
    assert not young.is_leftover_sentinel(written + 1.0)
    assert young.is_leftover_sentinel(written + SENTINEL_LEFTOVER_AFTER + 1.0)
    timeless = Message({SENTINEL_HEADER: "0f3a9c"}, "")  # an earlier version's token
    assert timeless.is_leftover_sentinel(written)
    plain = Message({"gtrid": "c.1"}, "")
    assert plain.sentinel_age(written) is None
    assert not plain.is_leftover_sentinel(written + 1e9)
