"""STOMP 1.2 headers: which ones a business message may carry, and how a frame writes them.

Both STOMP clients (``participants.stomp_client``, ``participants.aio.stomp``)
write every frame's headers through :func:`frame_headers`, and both broker
sessions build a message's headers with :func:`message_headers`. Nothing here
does I/O.

Escaping (STOMP 1.2, "Value Encoding"): in every frame but CONNECT and
CONNECTED, a backslash, carriage return, line feed and colon are written as
``\\\\``, ``\\r``, ``\\n`` and ``\\c``, in header names as in values. stomp.py
(9.0) escapes values only and leaves names alone, so a name with a line feed
(``x\\ndestination``) broke the frame and ActiveMQ dropped the connection, and
a name with a colon arrived cut at the colon. Our clients hand stomp.py
frames already escaped, past its ``send_frame``, so nothing is escaped twice;
:func:`unescape` undoes it for the frames received (``participants.stomp_frames``),
refusing the escapes STOMP 1.2 does not define, and ActiveMQ does the same.

What no frame can carry is refused, naming the header: NUL (it ends a frame),
lone surrogates (they have no UTF-8: stomp.py would write ``?`` instead) and
what is not a string. A body must be a string without lone surrogates (a
non-str body failed only when the group commit wrote it, failing the whole
group). A business
message also refuses empty names, control characters in names
(``x\\ndestination`` is an attempt to set another header, whatever the
escaping makes of it), and the names the protocol owns (:data:`RESERVED`,
:data:`RESERVED_PREFIXES`): the coordinator sets them itself, the broker sets
them on delivery, or ActiveMQ parses them and drops the whole connection on a
value it cannot parse -- and with it the broker transaction that a group
commit shares with other sessions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from coordinator import tracing
from coordinator.errors import ParticipantError

#: Header of the message ``StompClient.browse_complete`` appends to a queue.
SENTINEL_HEADER = "twopc-browse-sentinel"

#: Frames whose headers STOMP 1.2 does not escape.
UNESCAPED_COMMANDS = frozenset({"CONNECT", "STOMP", "CONNECTED"})

_ESCAPES = str.maketrans({"\\": "\\\\", "\r": "\\r", "\n": "\\n", ":": "\\c"})

#: A text whose every backslash starts one of the escapes STOMP 1.2 defines.
_WELL_ESCAPED = re.compile(r"(?:[^\\]|\\[\\rnc])*", re.S)

#: The first escape STOMP 1.2 does not define (a backslash ending the text is one).
_UNDEFINED_ESCAPE = re.compile(r"(?:[^\\]|\\[\\rnc])*(\\(?:.|\Z))", re.S)

#: Characters no header can carry: NUL ends the frame; a lone surrogate has no UTF-8
#: (stomp.py would silently write "?").
_UNCARRIABLE = re.compile("[\x00\ud800-\udfff]")

#: What a body cannot carry (NUL can: the frame has a content-length).
_SURROGATE = re.compile("[\ud800-\udfff]")

#: What a business message's header name may not contain: control characters
#: (a line break in a name is a header injection, never a name) and lone surrogates.
_BAD_NAME = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")

#: One search finds what must be escaped and what cannot be carried at all.
_SPECIAL = re.compile("[\\\\\r\n:\x00\ud800-\udfff]")

_SET_BY_BROKER = "the broker sets it on the messages it delivers"
_TRACING = "the coordinator sets it from the current trace context (coordinator.tracing)"
_UNPARSABLE = (
    "ActiveMQ parses it as a number and drops the whole connection on a value it cannot "
    "parse, failing every transaction that shares its commit"
)

#: Names a business message may not carry, and why.
RESERVED: Mapping[str, str] = {
    "destination": "the destination is send()'s first argument",
    "transaction": "the coordinator sends every message in its gtrid's broker transaction",
    "receipt": "the coordinator asks for the receipts it waits for",
    "content-length": "the client computes it from the body",
    "persistent": (
        "every message is persistent: a non-persistent one is lost when the broker is killed"
    ),
    "expires": (
        "a message that expires after its transaction committed goes to ActiveMQ.DLQ instead "
        "of its consumer, and a committed message must not disappear"
    ),
    "priority": _UNPARSABLE,
    "timestamp": _UNPARSABLE,
    "message-id": _SET_BY_BROKER,
    "redelivered": _SET_BY_BROKER,
    "subscription": _SET_BY_BROKER,
    "ack": _SET_BY_BROKER,
    "browser": "the broker ends a browse with a message carrying browser:end",
    SENTINEL_HEADER: "it marks twopc's browse sentinels, which every browse leaves out",
    "traceparent": _TRACING,
    "tracestate": _TRACING,
    "baggage": _TRACING,
}

#: Name prefixes ActiveMQ maps to typed JMS headers and scheduler properties
#: (JMSXGroupSeq, JMSPriority, AMQ_SCHEDULED_DELAY, ...).
RESERVED_PREFIXES = ("JMS", "AMQ_")
_PREFIX_REASON = (
    "ActiveMQ maps names starting with JMS or AMQ_ to typed JMS headers and scheduler "
    "properties, and drops the whole connection on a value it cannot parse"
)

#: A name that needs no closer look: not empty, no control character or lone
#: surrogate, none of RESERVED_PREFIXES.
_PLAIN_NAME = re.compile(
    f"(?!{'|'.join(map(re.escape, RESERVED_PREFIXES))})[^\x00-\x1f\x7f\ud800-\udfff]+\\Z"
)


class InvalidMessage(ParticipantError, ValueError):
    """A message ``send()`` refuses (a body or header no frame can carry, a reserved header).

    Raised before anything is kept or sent: the transaction is unaffected and
    may go on without that message, or roll back.
    """


class InvalidHeader(InvalidMessage):
    """A header a STOMP frame cannot carry, or that a business message may not set."""

    def __init__(
        self, name: object, why: str, *, participant: str, gtrid: str | None = None
    ) -> None:
        super().__init__(f"header {name!r} refused: {why}", participant=participant, gtrid=gtrid)
        self.header = name


def message_headers(
    destination: str,
    body: str,
    headers: Mapping[str, str] | None,
    *,
    gtrid: str,
    participant: str,
) -> dict[str, str]:
    """The headers of a business message of ``gtrid``: the application's, checked, plus
    the ``gtrid`` header and, when tracing is on, the current trace context.

    InvalidHeader for a name or value that is not a string, an empty name, NUL
    or a lone surrogate, a reserved name, or a ``gtrid`` header naming another
    transaction (the coordinator sets it to ``gtrid``); for a ``destination``
    with NUL or a lone surrogate too. InvalidMessage for a ``body`` that is not
    a string or has a lone surrogate (no UTF-8 for it). The destination's form
    is ``participants.stomp_client.check_destination``'s to check.
    """
    if not isinstance(body, str) or (not body.isascii() and _SURROGATE.search(body)):
        why = (
            "it contains a lone surrogate, which has no UTF-8 encoding"
            if isinstance(body, str)
            else f"it must be a string, not {type(body).__name__}"
        )
        raise InvalidMessage(f"message body refused: {why}", participant=participant, gtrid=gtrid)
    if _UNCARRIABLE.search(destination):
        why = _uncarriable("destination", destination)
        raise InvalidHeader("destination", why, participant=participant, gtrid=gtrid)
    stamped: dict[str, str] = {}
    for name, value in (headers or {}).items():
        # The common case in one expression (this runs for every message); _refusal
        # then says what is wrong, or accepts a gtrid header equal to the gtrid.
        if not (
            isinstance(name, str)
            and isinstance(value, str)
            and name not in RESERVED
            and name != tracing.GTRID_HEADER
            and _PLAIN_NAME.match(name)
            and not _UNCARRIABLE.search(value)
        ):
            refusal = _refusal(name, value, gtrid)
            if refusal is not None:
                raise InvalidHeader(name, refusal, participant=participant, gtrid=gtrid)
        stamped[name] = value
    stamped[tracing.GTRID_HEADER] = gtrid
    if tracing.RECORDING:  # decided once, when the coordinator was made: no call without it
        tracing.inject(stamped)
    return stamped


def _refusal(name: object, value: object, gtrid: str) -> str | None:
    """Why a business message may not carry ``name: value``; None if it may."""
    if not isinstance(name, str):
        return f"a header name must be a string, not {type(name).__name__}"
    if not isinstance(value, str):
        return f"its value must be a string, not {type(value).__name__}"
    if not name:
        return "a header name cannot be empty"
    reason = RESERVED.get(name)
    if reason is not None:
        return f"the protocol owns it: {reason}"
    if name.startswith(RESERVED_PREFIXES):
        return f"the protocol owns it: {_PREFIX_REASON}"
    if name == tracing.GTRID_HEADER and value != gtrid:
        return f"the coordinator sets it to the transaction's gtrid, not {value!r}"
    if _BAD_NAME.search(name):
        return (
            "a header name cannot contain control characters (a line break would start "
            "another header) or lone surrogates"
        )
    if _UNCARRIABLE.search(value):
        return _uncarriable(name, value)
    return None


def _uncarriable(name: str, value: str) -> str:
    where = "its name" if _UNCARRIABLE.search(name) else "its value"
    return f"{where} contains NUL or a lone surrogate, which no STOMP frame can carry"


class UndefinedEscape(ValueError):
    """A header of a received frame holds an escape STOMP 1.2 does not define."""


def unescape(text: str) -> str:
    """A received header name or value as it was before :func:`frame_headers` escaped it.

    UndefinedEscape for a backslash followed by anything but ``r``, ``n``, ``c``
    or a backslash, or ending the text. A text without a backslash is returned as is.
    """
    if "\\" not in text:
        return text
    if not _WELL_ESCAPED.fullmatch(text):
        undefined = _UNDEFINED_ESCAPE.match(text)
        sequence = undefined.group(1) if undefined else text
        raise UndefinedEscape(
            f"undefined escape {sequence!r} (STOMP 1.2 defines only \\r \\n \\c \\\\, and "
            "calls any other a fatal protocol error)"
        )
    # Escaped backslashes first, pairing from the left as a reader does: what is
    # between them holds only \r, \n and \c.
    return "\\".join(
        part.replace("\\c", ":").replace("\\n", "\n").replace("\\r", "\r")
        for part in text.split("\\\\")
    )


def frame_headers(
    command: str, headers: Mapping[str, str], *, participant: str, gtrid: str | None = None
) -> dict[str, str]:
    """``headers`` as a ``command`` frame writes them: names and values escaped, except
    in CONNECT; InvalidHeader for one no frame can carry (NUL, a lone surrogate, not a str).
    """
    if command in UNESCAPED_COMMANDS:
        return dict(headers)
    escaped: dict[str, str] = {}
    for name, value in headers.items():
        try:
            special = _SPECIAL.search(name) or _SPECIAL.search(value)
        except TypeError:  # not a str: stomp.py would have written its str()
            why = f"a header name and value must be strings, not {type(name).__name__}"
            why += f" and {type(value).__name__}"
            raise InvalidHeader(name, why, participant=participant, gtrid=gtrid) from None
        if special:
            if _UNCARRIABLE.search(name) or _UNCARRIABLE.search(value):
                why = _uncarriable(name, value)
                raise InvalidHeader(name, why, participant=participant, gtrid=gtrid)
            name, value = name.translate(_ESCAPES), value.translate(_ESCAPES)
        escaped[name] = value
    return escaped
