"""STOMP headers: what a business message may carry, and how both clients escape frames.

No lab: the sync client writes into a list instead of a socket, and stomp.py's
own parser reads the bytes back. tests/test_activemq.py sends the same headers
through the real broker.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stomp import utils as frames

from coordinator.errors import ParticipantError
from participants.aio.stomp import encode
from participants.stomp_client import StompClient
from participants.stomp_headers import (
    RESERVED,
    RESERVED_PREFIXES,
    InvalidHeader,
    InvalidMessage,
    frame_headers,
    message_headers,
)

Q = "/queue/q"


def sync_frame(headers: dict[str, str], body: str = "body") -> bytes:
    """The bytes the sync client writes for a SEND carrying ``headers``."""
    client = StompClient("127.0.0.1:1")
    written: list[bytes] = []
    client._write = written.append
    client.send("/queue/q", body, headers, transaction="t1")
    [frame] = written
    return frame


def parsed(frame: bytes) -> dict[str, str]:
    """The headers stomp.py's parser (as our receivers use it) reads from ``frame``."""
    result = frames.parse_frame(frame.rstrip(b"\x00"))
    assert result is not None
    headers: dict[str, str] = result.headers
    return headers


def test_names_and_values_are_escaped_once() -> None:
    """A colon, backslash, CR and LF are escaped once, in names and values (STOMP 1.2)."""
    escaped = frame_headers("SEND", {"x:y\\z": "a:b\\c\r\nd"}, participant="mq")
    assert escaped == {"x\\cy\\\\z": "a\\cb\\\\c\\r\\nd"}


def test_sync_and_aio_clients_write_the_same_escaped_frame() -> None:
    """The sync client (past stomp.py's own value escaping) and the aio client write one frame."""
    headers = {"x:y": "a\\b\nc", "type": "t"}
    sync = sync_frame(headers)
    assert b"\nx\\cy:a\\\\b\\nc\n" in sync
    aio = encode(
        "SEND",
        {
            **headers,
            "destination": "/queue/q",
            "persistent": "true",
            "transaction": "t1",
            "content-length": "4",
        },
        "body",
    )
    assert sync == aio


@given(
    st.dictionaries(
        st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1),
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")),
        max_size=4,
    )
)
def test_every_allowed_header_reads_back_exactly(headers: dict[str, str]) -> None:
    """Any header a message may carry is read back by stomp.py's parser exactly as sent."""
    owned = (*RESERVED, "gtrid")
    allowed = {
        k: v for k, v in headers.items() if k not in owned and not k.startswith(RESERVED_PREFIXES)
    }
    stamped = message_headers(Q, "body", allowed, gtrid="g1", participant="mq")
    frame = encode("SEND", {**stamped, "destination": "/queue/q"}, "")
    assert parsed(frame) == {**stamped, "destination": "/queue/q"}


def test_connect_headers_are_not_escaped() -> None:
    """CONNECT is written unescaped (STOMP 1.2), so a passcode with a colon arrives as typed."""
    frame = encode("CONNECT", {"accept-version": "1.2", "passcode": "a:b\\c"})
    assert b"\npasscode:a:b\\c\n" in frame


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_reserved_names_are_refused_with_the_reason(name: str) -> None:
    """Every header the protocol owns is refused, saying why and naming participant and gtrid."""
    with pytest.raises(InvalidHeader) as raised:
        message_headers(Q, "body", {name: "1"}, gtrid="g1", participant="mq")
    assert str(raised.value) == (
        f"header {name!r} refused: the protocol owns it: {RESERVED[name]} "
        "(participant 'mq', gtrid g1)"
    )
    assert isinstance(raised.value, ParticipantError)
    assert isinstance(raised.value, ValueError)


def test_expires_is_refused_because_a_committed_message_would_expire() -> None:
    """``expires`` is refused: it would send a committed message to ActiveMQ.DLQ."""
    with pytest.raises(InvalidHeader, match=r"'expires' refused: .*ActiveMQ\.DLQ"):
        message_headers(Q, "body", {"expires": "1"}, gtrid="g1", participant="mq")


@pytest.mark.parametrize("name", ["JMSXGroupSeq", "JMSPriority", "AMQ_SCHEDULED_DELAY"])
def test_names_activemq_parses_are_refused(name: str) -> None:
    """JMS* and AMQ_* names are refused: ActiveMQ drops the connection on a bad value."""
    with pytest.raises(InvalidHeader, match="drops the whole connection"):
        message_headers(Q, "body", {name: "abc"}, gtrid="g1", participant="mq")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"x\ndestination": "/queue/other"}, "cannot contain control characters"),
        ({"x\rdestination": "/queue/other"}, "cannot contain control characters"),
        ({"a\x00b": "v"}, "cannot contain control characters"),
        ({"a\ud800": "v"}, "or lone surrogates"),
        ({"k": "a\x00b"}, "its value contains NUL or a lone surrogate"),
        ({"k": "\udfff"}, "its value contains NUL or a lone surrogate"),
        ({"": "v"}, "a header name cannot be empty"),
        ({"k": 1}, "its value must be a string, not int"),
        ({"k": None}, "its value must be a string, not NoneType"),
        ({b"k": "v"}, "a header name must be a string, not bytes"),
        ({"gtrid": "other"}, "sets it to the transaction's gtrid, not 'other'"),
    ],
)
def test_uncarriable_headers_are_refused(headers: dict[object, object], why: str) -> None:
    """What a frame cannot carry, or would carry as another header, is refused by name."""
    with pytest.raises(InvalidHeader, match="refused: .*" + why) as raised:
        message_headers(Q, "body", headers, gtrid="g1", participant="mq")  # type: ignore[arg-type]
    assert raised.value.header == next(iter(headers))
    assert "(participant 'mq', gtrid g1)" in str(raised.value)


def test_application_headers_are_kept_and_stamped_with_the_gtrid() -> None:
    """Application headers (``type``, names with a colon, line breaks in values) are kept."""
    headers = {"type": "transfer.credit", "x:y": "line\nbreak", "gtrid": "g1", "reply-to": "r"}
    assert message_headers(Q, "body", headers, gtrid="g1", participant="mq") == {
        **headers,
        "gtrid": "g1",
    }
    assert message_headers(Q, "body", None, gtrid="g1", participant="mq") == {"gtrid": "g1"}


def test_a_frame_never_carries_what_it_cannot() -> None:
    """Whoever builds the frame (a relay, a consumer), NUL or a non-str header is refused."""
    with pytest.raises(InvalidHeader, match="its value contains NUL"):
        frame_headers("SEND", {"k": "a\x00"}, participant="relay", gtrid="g2")
    with pytest.raises(InvalidHeader, match="'k\\\\x00' refused"):
        sync_frame({"k\x00": "v"})
    with pytest.raises(InvalidHeader, match=r"'k' refused: .* must be strings, not str and int"):
        frame_headers("SEND", {"k": 1}, participant="relay")  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("caf\udce9", "it contains a lone surrogate, which has no UTF-8 encoding"),
        (b"bytes", "it must be a string, not bytes"),
    ],
)
def test_a_body_no_frame_can_carry_is_refused(body: object, why: str) -> None:
    """A body that is not a str, or has a lone surrogate, is refused before anything is sent."""
    with pytest.raises(InvalidMessage) as raised:
        message_headers(Q, body, {}, gtrid="g1", participant="mq")  # type: ignore[arg-type]
    assert str(raised.value) == f"message body refused: {why} (participant 'mq', gtrid g1)"
    assert not isinstance(raised.value, InvalidHeader)


def test_a_destination_with_nul_is_refused() -> None:
    """A destination with NUL is refused by send(), not when the frame is written."""
    with pytest.raises(InvalidHeader, match="'destination' refused: its value contains NUL"):
        message_headers("/queue/a\x00b", "", {}, gtrid="g1", participant="mq")


def test_bodies_with_nul_or_any_unicode_are_kept() -> None:
    """NUL (the frame has a content-length) and non-ASCII text are fine in a body."""
    assert message_headers(Q, "a\x00b", {}, gtrid="g1", participant="mq") == {"gtrid": "g1"}
    assert message_headers(Q, "débit 10 €", {}, gtrid="g1", participant="mq") == {"gtrid": "g1"}
