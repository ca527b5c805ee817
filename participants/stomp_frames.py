"""STOMP 1.2 frames from bytes, and to bytes: where each frame ends, its command, headers
and body; :func:`encode_frame` writes one.

:class:`FrameReader` is fed the bytes of a connection, cut anywhere, and
hands back whole frames (:class:`ReceivedFrame`) and heart-beats, in order.
It is the one path from bytes to frames of both STOMP clients: the protocol
core (:class:`participants.stomp_core.StompProtocol`) reads through it, over
asyncio streams and over stomp.py's socket alike (docs/design.md §5).

What STOMP 1.2 says, and what is done with it:

* A frame is a command line, header lines, a blank line, the body and a NUL.
  Lines end in LF or CRLF. An end-of-line between frames is a heart-beat.
* A ``content-length`` header gives the body's length in octets; the body may
  then hold NULs, and the octet after it must be the NUL that ends the frame.
  Without it the body ends at the first NUL.
* Header names and values are unescaped (``\\r \\n \\c \\\\``,
  :func:`participants.stomp_headers.unescape`), except in CONNECT and
  CONNECTED; any other escape is a fatal protocol error, as the specification
  says. Only a header with a backslash is looked at twice: the common frame
  costs a split of its header block and a partition per line, no regex.
* Of a header repeated, the first occurrence counts.
* A header line without a colon, a ``content-length`` that is not a number, a
  body longer than its ``content-length``: :class:`MalformedFrame`, never a
  guess.

Frames out (:func:`encode_frame`) are written as stomp.py's ``convert_frame`` writes
them, byte for byte (``tests/test_stomp_frames.py`` checks it), in one join and one
encode instead of an encode per line.

Nothing here does I/O or knows the connection; the core words the errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NamedTuple

from participants.stomp_headers import UNESCAPED_COMMANDS, UndefinedEscape, unescape


def encode_frame(command: str, headers: Mapping[str, str], body: str = "") -> bytes:
    """One frame's bytes: ``command``, ``headers`` as given (escaped already) sorted by
    name, a blank line, ``body`` in UTF-8 and a NUL. A ``content-length`` header present
    is set to the body's length in octets when there is a body. What UTF-8 cannot carry
    becomes ``?``, as in stomp.py (the clients check headers and bodies before).
    """
    data = body.encode("utf-8", errors="replace")
    lines = [command, "\n"]
    for name, value in sorted(headers.items()):
        if name == "content-length" and data:
            value = str(len(data))
        lines += (name, ":", value, "\n")
    lines.append("\n")
    return "".join(lines).encode("utf-8", errors="replace") + data + b"\x00"


class MalformedFrame(ValueError):
    """The bytes are not a STOMP 1.2 frame; the message says what is wrong."""


class ReceivedFrame(NamedTuple):
    """One frame as received: its command, its headers unescaped, its body's octets.

    A named tuple: one is made per frame, and a tuple is the cheapest to make."""

    command: str
    headers: dict[str, str]
    body: bytes


class _Heartbeat:
    """An end-of-line between frames."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HEARTBEAT"


#: What :meth:`FrameReader.next` returns for an end-of-line between frames.
HEARTBEAT: Final = _Heartbeat()


def parse_head(head: str) -> tuple[str, dict[str, str]]:
    """The command and headers of a frame's header block (its lines, without the blank one).

    MalformedFrame for a header line without a colon or an undefined escape.
    """
    lines = head.split("\n")
    if "\r" in head:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    command = lines[0]
    escaped = command not in UNESCAPED_COMMANDS
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise MalformedFrame(f"{command} frame: header line {line!r} has no colon")
        if escaped and "\\" in line:
            try:
                name, value = unescape(name), unescape(value)
            except UndefinedEscape as exc:
                raise MalformedFrame(f"{command} frame: header line {line!r}: {exc}") from None
        if name not in headers:  # STOMP 1.2: the first of repeated headers wins
            headers[name] = value
    return command, headers


class FrameReader:
    """One connection's received bytes, cut into frames and heart-beats (no I/O)."""

    __slots__ = ("_buffer", "_head")

    def __init__(self) -> None:
        self._buffer = bytearray()
        # The frame whose header block is read and whose body is still to come:
        # (command, headers, where its body starts, where its NUL must be or None).
        self._head: tuple[str, dict[str, str], int, int | None] | None = None

    def feed(self, data: bytes) -> None:
        """Add bytes received (any cut of the stream)."""
        self._buffer += data

    @property
    def buffered(self) -> int:
        """How many bytes wait for the rest of their frame."""
        return len(self._buffer)

    def next(self) -> ReceivedFrame | _Heartbeat | None:
        """The next whole frame or heart-beat, or None until more bytes come.

        MalformedFrame if the bytes are not STOMP 1.2 (the connection cannot go on).
        """
        buffer = self._buffer
        if self._head is None:
            first = buffer[:1]
            if first == b"\n":
                del buffer[:1]
                return HEARTBEAT
            if first == b"\r":
                if len(buffer) < 2:
                    return None  # the rest of a CRLF heart-beat is still to come
                if buffer[1:2] == b"\n":
                    del buffer[:2]
                    return HEARTBEAT
            lf = buffer.find(b"\n\n")
            crlf = buffer.find(b"\n\r\n", 0, lf + 1 if lf >= 0 else len(buffer))
            if crlf >= 0:
                end, body_start = crlf, crlf + 3
            elif lf >= 0:
                end, body_start = lf, lf + 2
            else:
                return None  # the header block is still to come
            command, headers = parse_head(buffer[:end].decode("utf-8", "replace"))
            length = headers.get("content-length")
            nul: int | None = None
            if length is not None:
                if not (length.isascii() and length.isdigit()):
                    raise MalformedFrame(
                        f"{command} frame: content-length {length!r} is not a number of octets"
                    )
                nul = body_start + int(length)
            self._head = (command, headers, body_start, nul)
        command, headers, body_start, nul = self._head
        if nul is None:
            nul = buffer.find(b"\x00", body_start)
            if nul < 0:
                return None
        elif len(buffer) <= nul:
            return None
        elif buffer[nul] != 0:
            self._head = None
            raise MalformedFrame(f"{command} frame does not end where its content-length says")
        body = bytes(buffer[body_start:nul])
        del buffer[: nul + 1]
        self._head = None
        return ReceivedFrame(command, headers, body)
