"""The decision log's byte layout: encoding records and scanning a log image back.

Layout (all integers big-endian; ``str`` is a u16 byte length then UTF-8)::

    file header, once, at offset 0 (HEADER_SIZE = 10 bytes)
      0   8  magic    b"TWOPCLOG"
      8   2  version  u16, currently 1

    record at offset o (RECORD_OVERHEAD + n bytes)
      o      4  n        u32 payload length, 1 <= n <= MAX_PAYLOAD
      o+4    1  type     u8: 1 COMMIT, 2 END, 3 CHECKPOINT
      o+5    n  payload  see below
      o+5+n  4  crc      u32 CRC-32C of the type byte and the payload

    payloads
      COMMIT      str gtrid, u16 count, count x str participant
      END         str gtrid
      CHECKPOINT  u32 count, count x COMMIT payload (the pending set at the time)

A CHECKPOINT replaces the pending set, so a compacted log is a header and
one CHECKPOINT; COMMIT and END records follow it.

Torn tail or corruption: a record *fails to frame* when its header is short,
its length is zero or above MAX_PAYLOAD, it runs past the end of the data, or
its CRC does not match. A crash during an append leaves such a record at the
very end and nothing valid after it, so: if no valid frame starts anywhere
after the failed record's first byte, it is a torn tail and the scan stops
there (the caller truncates); if a valid frame does start after it, the
damage is in the middle -- records that may have been acknowledged follow
it -- and the scan raises DecisionLogCorrupt at the failed record's offset.
Dropping those records silently could forget a commit, so refusing is the
only safe answer. Consequence: after a power loss, a filesystem that wrote
unsynced pages out of order (a hole, then a later record) is also refused;
none of those records was acknowledged as durable, but the log cannot know
that, so an operator decides.

A record that frames (its CRC matches) was written whole by a coordinator:
if its type is unknown or its payload does not decode, the scan raises
DecisionLogCorrupt wherever it is, even at the end -- it is a newer format or
a bug, never a torn write.

The header is written whole before the file gets its name (see file.py), so
a file shorter than the header that is a prefix of it is an uninitialised
log (``Scan.end == 0``); anything else that is not our header is corrupt at
offset 0.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

import google_crc32c

from coordinator.errors import DecisionLogCorrupt, UnloggableRecord

MAGIC = b"TWOPCLOG"
VERSION = 1
_HEADER = struct.Struct(">8sH")
HEADER = _HEADER.pack(MAGIC, VERSION)
HEADER_SIZE = _HEADER.size

_FRAME_HEAD = struct.Struct(">IB")  # payload length, type
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
RECORD_OVERHEAD = _FRAME_HEAD.size + _U32.size

#: Larger lengths are damage, not data: a checkpoint of a million pending
#: transactions stays far below this.
MAX_PAYLOAD = 1 << 28


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``, as the record's last four bytes hold it."""
    checksum: int = google_crc32c.value(bytes(data))
    return checksum


class RecordType(IntEnum):
    """The u8 type byte of a record."""

    COMMIT = 1
    END = 2
    CHECKPOINT = 3


@dataclass(frozen=True, slots=True)
class Commit:
    """The decision to commit ``gtrid``, with the participants phase 2 must reach."""

    gtrid: str
    participants: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class End:
    """``gtrid`` finished phase 2 everywhere: recovery can forget it."""

    gtrid: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The whole pending set at compaction time; replaces whatever came before."""

    pending: tuple[Commit, ...]


Record = Commit | End | Checkpoint


def apply(pending: dict[str, tuple[str, ...]], record: Record) -> None:
    """Update ``pending`` (gtrid -> participants of COMMITs without END) with ``record``."""
    if isinstance(record, Commit):
        pending[record.gtrid] = record.participants
    elif isinstance(record, End):
        # An END without a COMMIT is harmless: recovery may end what it resolved.
        pending.pop(record.gtrid, None)
    else:
        pending.clear()
        pending.update((c.gtrid, c.participants) for c in record.pending)


def replay(records: Iterable[Record]) -> dict[str, tuple[str, ...]]:
    """The pending set that ``records``, applied in order, leave behind."""
    pending: dict[str, tuple[str, ...]] = {}
    for record in records:
        apply(pending, record)
    return pending


# -- encoding -----------------------------------------------------------------


def _str(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if not raw or len(raw) > 0xFFFF:
        raise UnloggableRecord(f"{what} {value[:20]!r} must be 1 to 65535 bytes of UTF-8")
    return _U16.pack(len(raw)) + raw


@functools.lru_cache(maxsize=256)
def _participants(names: tuple[str, ...]) -> bytes:
    """The u16 count and the names of a COMMIT payload. A coordinator names the same few
    participants in every record: they are encoded once per set, not once per record."""
    return _U16.pack(len(names)) + b"".join(_str(name, "participant name") for name in names)


def _commit_payload(commit: Commit) -> bytes:
    if len(commit.participants) > 0xFFFF:
        raise UnloggableRecord(f"transaction {commit.gtrid} has too many participants")
    return _str(commit.gtrid, "gtrid") + _participants(commit.participants)


#: The CRC-32C of each type byte alone: a record's CRC extends it over the payload.
_TYPE_CRC = {rtype: crc32c(bytes([rtype])) for rtype in RecordType}


def encode(record: Record) -> bytes:
    """The bytes of one framed record, ready to append."""
    if isinstance(record, Commit):
        rtype, payload = RecordType.COMMIT, _commit_payload(record)
    elif isinstance(record, End):
        rtype, payload = RecordType.END, _str(record.gtrid, "gtrid")
    else:
        body = b"".join(_commit_payload(c) for c in record.pending)
        rtype, payload = RecordType.CHECKPOINT, _U32.pack(len(record.pending)) + body
    if len(payload) > MAX_PAYLOAD:
        raise UnloggableRecord(f"{rtype.name} record of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    crc: int = google_crc32c.extend(_TYPE_CRC[rtype], payload)
    return _FRAME_HEAD.pack(len(payload), rtype) + payload + _U32.pack(crc)


# -- scanning -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scan:
    """What a log image holds: its good records and where the good part ends.

    ``end`` is the offset just past the last good record (where the next
    record goes); ``end < len(data)`` means a torn tail to truncate, and
    ``end == 0`` means not even the header is there: initialise the log.
    """

    records: list[Record]
    end: int


def scan(data: bytes, path: str) -> Scan:
    """Parse a whole log image; raise DecisionLogCorrupt (naming ``path``) on damage."""
    if len(data) < HEADER_SIZE:
        if HEADER.startswith(data):
            return Scan([], 0)
        raise DecisionLogCorrupt(path, 0, "file is shorter than a header and is not a log header")
    magic, version = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecisionLogCorrupt(path, 0, f"bad magic {magic!r}: not a twopc decision log")
    if version != VERSION:
        raise DecisionLogCorrupt(path, len(MAGIC), f"unsupported log version {version}")

    view = memoryview(data)
    records: list[Record] = []
    pos = HEADER_SIZE
    while pos < len(data):
        frame = _frame_at(view, pos)
        if isinstance(frame, str):
            if _any_frame_after(view, pos):
                raise DecisionLogCorrupt(
                    path, pos, f"{frame}, and valid records follow it (not a torn write)"
                )
            break
        rtype, payload, after = frame
        records.append(_decode(rtype, payload, path, pos))
        pos = after
    return Scan(records, pos)


@dataclass(frozen=True, slots=True)
class Entry:
    """One stretch of a log image, for tools that look at a damaged log.

    Either a record that decodes (``record``) or a stretch of damage
    (``problem``) running to the next valid frame or to the end of the file.
    """

    offset: int
    size: int
    record: Record | None = None
    problem: str | None = None


def walk(data: bytes, path: str) -> Iterator[Entry]:
    """Every record and every damaged stretch of a log image, in order; never raises.

    Unlike :func:`scan`, it goes on past damage (to the next valid frame), so
    an operator sees what the records after a damaged one say.
    """
    try:
        if len(data) < HEADER_SIZE and HEADER.startswith(data):
            return
        scan(data[:HEADER_SIZE], path)
    except DecisionLogCorrupt as exc:
        yield Entry(0, len(data), problem=exc.reason)
        return
    view = memoryview(data)
    pos = HEADER_SIZE
    while pos < len(data):
        frame = _frame_at(view, pos)
        if isinstance(frame, str):
            following = _next_frame(view, pos)
            end = len(data) if following is None else following
            tail = " (a torn tail: the next open truncates it)" if following is None else ""
            yield Entry(pos, end - pos, problem=frame + tail)
            pos = end
            continue
        rtype, payload, after = frame
        try:
            yield Entry(pos, after - pos, record=_decode(rtype, payload, path, pos))
        except DecisionLogCorrupt as exc:
            yield Entry(pos, after - pos, problem=exc.reason)
        pos = after


def _frame_at(view: memoryview, pos: int) -> tuple[int, memoryview, int] | str:
    """(type, payload, offset after) of the record at ``pos``, or why it does not frame."""
    available = len(view) - pos
    if available < RECORD_OVERHEAD:
        return f"record header is short ({available} bytes left)"
    length, rtype = _FRAME_HEAD.unpack_from(view, pos)
    if length == 0:
        return "record has a zero payload length"
    if length > MAX_PAYLOAD:
        return f"record length {length} exceeds the maximum {MAX_PAYLOAD}"
    after = pos + RECORD_OVERHEAD + length
    if after > len(view):
        return f"record of {length} payload bytes runs past the end of the file"
    typed = view[pos + 4 : after - 4]
    (stored,) = _U32.unpack_from(view, after - 4)
    computed = crc32c(typed)
    if stored != computed:
        return f"record CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
    return rtype, typed[1:], after


def _any_frame_after(view: memoryview, pos: int) -> bool:
    """Whether a valid frame starts anywhere after ``pos`` (see the module docstring)."""
    return _next_frame(view, pos) is not None


def _next_frame(view: memoryview, pos: int) -> int | None:
    """The offset of the first valid frame after ``pos``, if any."""
    for p in range(pos + 1, len(view) - RECORD_OVERHEAD + 1):
        if not isinstance(_frame_at(view, p), str):
            return p
    return None


class _Reader:
    """Reads a payload field by field; any overrun raises ValueError."""

    def __init__(self, payload: memoryview) -> None:
        self._payload = payload
        self._pos = 0

    def take(self, size: int) -> memoryview:
        if self._pos + size > len(self._payload):
            raise ValueError("payload ends in the middle of a field")
        chunk = self._payload[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def text(self) -> str:
        return bytes(self.take(self.u16())).decode("utf-8")

    def commit(self) -> Commit:
        gtrid = self.text()
        return Commit(gtrid, tuple(self.text() for _ in range(self.u16())))

    def done(self) -> None:
        if self._pos != len(self._payload):
            raise ValueError(f"{len(self._payload) - self._pos} unexpected bytes after the payload")


def _decode(rtype: int, payload: memoryview, path: str, pos: int) -> Record:
    try:
        kind = RecordType(rtype)
    except ValueError:
        raise DecisionLogCorrupt(path, pos, f"unknown record type {rtype}") from None
    reader = _Reader(payload)
    try:
        record: Record
        if kind is RecordType.COMMIT:
            record = reader.commit()
        elif kind is RecordType.END:
            record = End(reader.text())
        else:
            record = Checkpoint(tuple(reader.commit() for _ in range(reader.u32())))
        reader.done()
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise DecisionLogCorrupt(path, pos, f"{kind.name} payload does not decode: {exc}") from None
    return record
