"""twopc's STOMP 1.2 frame reader without sockets: round trips cut anywhere, agreement with
stomp.py's parser on valid frames, and the refusals the specification asks for."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stomp import utils as stomp_utils

from participants.stomp_core import StompProtocol, StompProtocolError, encode
from participants.stomp_frames import (
    HEARTBEAT,
    FrameReader,
    MalformedFrame,
    ReceivedFrame,
    encode_frame,
    parse_head,
)
from participants.stomp_headers import UndefinedEscape, unescape

#: Characters a header can carry, the ones STOMP escapes many times over.
_HEADER_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("\\\r\n:c rn"),
        st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    ),
    max_size=12,
)
_NAMES = _HEADER_TEXT.filter(lambda name: name != "" and name != "content-length")
_COMMANDS = st.sampled_from(["SEND", "MESSAGE", "ERROR", "RECEIPT", "SUBSCRIBE", "ACK", "COMMIT"])
_BODIES = st.text(
    alphabet=st.one_of(st.sampled_from("\x00\n\r:"), st.characters(blacklist_categories=["Cs"])),
    max_size=20,
)


@st.composite
def encodable_frames(draw: st.DrawFn) -> tuple[bytes, ReceivedFrame]:
    """A frame as twopc encodes it, and the frame it must read back."""
    command = draw(_COMMANDS)
    headers = draw(st.dictionaries(_NAMES, _HEADER_TEXT, max_size=5))
    body = draw(_BODIES)
    sent = dict(headers)
    expected = dict(headers)
    if body or draw(st.booleans()):
        sent["content-length"] = "0"  # stomp.py's encoder writes the real length
        expected["content-length"] = str(len(body.encode()))
    data = encode(command, sent, body)
    return data, ReceivedFrame(command, expected, body.encode())


def read_all(reader: FrameReader, pieces: list[bytes]) -> list[object]:
    """Everything the reader gives for ``pieces`` fed one after the other."""
    found: list[object] = []
    for piece in pieces:
        reader.feed(piece)
        while (item := reader.next()) is not None:
            found.append(item)
    return found


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (positions modulo its length)."""
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(marks)]


@given(encodable_frames(), encodable_frames(), st.lists(st.integers(min_value=0), max_size=8))
def test_a_frame_twopc_encodes_reads_back_whole_when_cut_anywhere(
    first: tuple[bytes, ReceivedFrame], second: tuple[bytes, ReceivedFrame], points: list[int]
) -> None:
    """Two encoded frames and a heart-beat, cut at any bytes, read back as they were sent."""
    data = first[0] + b"\n" + second[0]
    assert read_all(FrameReader(), cut(data, points)) == [first[1], HEARTBEAT, second[1]]


@given(encodable_frames())
def test_a_frame_read_one_byte_at_a_time_is_the_frame(sent: tuple[bytes, ReceivedFrame]) -> None:
    """Fed one byte at a time, a frame is read once, whole, when its NUL arrives."""
    data, expected = sent
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert read_all(FrameReader(), pieces) == [expected]


@given(encodable_frames())
def test_crlf_line_ends_read_as_lf_ones(sent: tuple[bytes, ReceivedFrame]) -> None:
    """The same frame with CRLF line ends in its header block reads the same."""
    data, expected = sent
    head, _, body = data.partition(b"\n\n")
    crlf = head.replace(b"\n", b"\r\n") + b"\r\n\r\n" + body
    assert read_all(FrameReader(), [crlf]) == [expected]


@given(encodable_frames())
def test_the_reader_agrees_with_stomp_py_on_valid_frames(sent: tuple[bytes, ReceivedFrame]) -> None:
    """For a valid frame, command, headers and body are what stomp.utils.parse_frame reads."""
    data, _ = sent
    [ours] = read_all(FrameReader(), [data])
    theirs = stomp_utils.parse_frame(data[:-1])  # stomp.py's transport cuts the NUL off
    assert isinstance(ours, ReceivedFrame)
    assert (ours.command, ours.headers, ours.body) == (theirs.cmd, theirs.headers, theirs.body)


@given(
    _COMMANDS,
    st.dictionaries(_NAMES, _HEADER_TEXT, max_size=5),
    st.one_of(st.none(), _HEADER_TEXT),
    st.text(alphabet=st.one_of(st.characters(), st.sampled_from("\ud800\udfff\x00")), max_size=20),
)
def test_frames_are_written_as_stomp_py_writes_them(
    command: str, headers: dict[str, str], length: str | None, body: str
) -> None:
    """encode_frame writes the bytes stomp.utils.convert_frame writes for the same frame
    (sorted headers, a content-length set from the body, lone surrogates as '?')."""
    if length is not None:
        headers["content-length"] = length
    theirs = b"".join(stomp_utils.convert_frame(stomp_utils.Frame(command, dict(headers), body)))
    assert encode_frame(command, headers, body) == theirs


def test_the_first_of_repeated_headers_wins() -> None:
    """STOMP 1.2: of a header repeated, only the first occurrence counts."""
    assert parse_head("MESSAGE\nfoo:1\nfoo:2\nbar:x") == ("MESSAGE", {"foo": "1", "bar": "x"})


def test_connect_and_connected_headers_are_not_unescaped() -> None:
    """CONNECTED keeps a backslash and a colon in a value as they are (STOMP 1.2)."""
    command, headers = parse_head("CONNECTED\nserver:a\\b:c")
    assert (command, headers) == ("CONNECTED", {"server": "a\\b:c"})


def test_a_body_with_nuls_is_read_to_its_content_length() -> None:
    """With content-length, NULs in the body do not end the frame."""
    reader = FrameReader()
    reader.feed(b"MESSAGE\ncontent-length:3\n\na\x00b\x00")
    assert reader.next() == ReceivedFrame("MESSAGE", {"content-length": "3"}, b"a\x00b")


def test_heart_beats_lf_and_crlf_and_a_cr_waiting_for_its_lf() -> None:
    """An LF or CRLF between frames is a heart-beat; a lone CR waits for the rest."""
    reader = FrameReader()
    assert read_all(reader, [b"\n\r\n\r"]) == [HEARTBEAT, HEARTBEAT]
    assert reader.buffered == 1
    assert read_all(reader, [b"\nRECEIPT\nreceipt-id:r-1\n\n\x00"]) == [
        HEARTBEAT,
        ReceivedFrame("RECEIPT", {"receipt-id": "r-1"}, b""),
    ]


@pytest.mark.parametrize(
    ("text", "plain"),
    [("a\\cb", "a:b"), ("\\\\\\n\\r", "\\\n\r"), ("no escape", "no escape")],
)
def test_unescape_undoes_the_four_escapes(text: str, plain: str) -> None:
    """\\c, \\\\, \\n and \\r stand for a colon, a backslash, LF and CR."""
    assert unescape(text) == plain


@pytest.mark.parametrize("text", ["a\\tb", "a\\", "\\C"])
def test_an_undefined_escape_is_refused(text: str) -> None:
    """Any other escape, and a backslash ending the text, is a fatal error (STOMP 1.2)."""
    with pytest.raises(UndefinedEscape, match="undefined escape"):
        unescape(text)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"MESSAGE\nfoo:a\\tb\n\n\x00", r"header line 'foo:a\\\\tb': undefined escape '\\\\t'"),
        (b"MESSAGE\nno colon here\n\n\x00", "header line 'no colon here' has no colon"),
        (b"MESSAGE\ncontent-length:x1\n\nab\x00", "content-length 'x1' is not a number"),
        (b"MESSAGE\ncontent-length:1\n\nab\x00", "does not end where its content-length says"),
    ],
)
def test_malformed_frames_are_refused_with_what_is_wrong(data: bytes, words: str) -> None:
    """An undefined escape, a header line without a colon, a bad content-length: refused."""
    reader = FrameReader()
    reader.feed(data)
    with pytest.raises(MalformedFrame, match=words):
        reader.next()


def test_the_core_words_a_malformed_frame_as_a_protocol_error() -> None:
    """The protocol core names the broker and says the bytes are not STOMP 1.2."""
    protocol = StompProtocol("127.0.0.1:61613", participant="mq")
    protocol.connect()
    with pytest.raises(StompProtocolError, match=r"127.0.0.1:61613 sent bytes that are not STOMP"):
        protocol.receive_data(b"CONNECTED\nversion:1.2\n\n\x00MESSAGE\nbad\n\n\x00")


def test_a_receipt_nobody_awaits_does_not_hold_back_the_frames_after_it() -> None:
    """Frames after an unawaited RECEIPT in the same bytes are read at once, not later."""
    protocol = StompProtocol("127.0.0.1:61613", participant="mq")
    protocol.connect()
    events = protocol.receive_data(
        b"CONNECTED\nversion:1.2\n\n\x00RECEIPT\nreceipt-id:r-99\n\n\x00"
        b"MESSAGE\nsubscription:s\n\nhi\x00"
    )
    assert [type(e).__name__ for e in events] == ["Connected", "MessageReceived"]
