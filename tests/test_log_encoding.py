"""The decision log's records are the bytes its documented layout says (format.py's
docstring), built here independently: encoding a participant set once for many records
and extending the type byte's CRC change no byte, and bad records are refused every time."""

from __future__ import annotations

import struct

import google_crc32c
import pytest

from coordinator.errors import UnloggableRecord
from coordinator.log import format as fmt


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def _framed(rtype: int, payload: bytes) -> bytes:
    typed = bytes([rtype]) + payload
    return struct.pack(">I", len(payload)) + typed + struct.pack(">I", google_crc32c.value(typed))


def _commit_payload(gtrid: str, names: tuple[str, ...]) -> bytes:
    return _text(gtrid) + struct.pack(">H", len(names)) + b"".join(_text(n) for n in names)


@pytest.mark.parametrize("names", [("a", "b", "mq"), ("a",), (), ("bänk", "b"), ("a", "b", "mq")])
def test_commit_and_end_records_follow_the_layout(names: tuple[str, ...]) -> None:
    """COMMIT and END of several transactions (the same participants each time) are the
    documented bytes."""
    for gtrid in ("twopc-1.x", "tx-ü-2", "g" * 300):
        commit = fmt.encode(fmt.Commit(gtrid, names))
        assert commit == _framed(1, _commit_payload(gtrid, names))
        assert fmt.encode(fmt.End(gtrid)) == _framed(2, _text(gtrid))


def test_a_checkpoint_follows_the_layout() -> None:
    """A CHECKPOINT is its count and its COMMIT payloads, framed."""
    pending = (fmt.Commit("t1", ("a", "b")), fmt.Commit("t2", ("a", "b")), fmt.Commit("t3", ()))
    payload = struct.pack(">I", 3) + b"".join(
        _commit_payload(c.gtrid, c.participants) for c in pending
    )
    assert fmt.encode(fmt.Checkpoint(pending)) == _framed(3, payload)
    assert fmt.encode(fmt.Checkpoint(())) == _framed(3, struct.pack(">I", 0))


def test_records_encoded_scan_back() -> None:
    """What encode writes, scan reads back as the same records."""
    records: list[fmt.Record] = [
        fmt.Commit("t1", ("a", "b", "mq")),
        fmt.Commit("t2", ("a", "b", "mq")),
        fmt.End("t1"),
        fmt.Checkpoint((fmt.Commit("t2", ("a", "b", "mq")),)),
    ]
    data = fmt.HEADER + b"".join(fmt.encode(r) for r in records)
    assert fmt.scan(data, "mem").records == records


def test_a_bad_participant_name_is_refused_every_time() -> None:
    """A participant name too long for a record is refused on each attempt, not only the
    first (a refusal is not remembered as an encoding)."""
    names = ("a", "x" * 70000)
    for _ in range(2):
        with pytest.raises(UnloggableRecord, match=r"^participant name 'x{20}' must be"):
            fmt.encode(fmt.Commit("t1", names))


def test_too_many_participants_are_refused_naming_the_transaction() -> None:
    """A COMMIT of more than 65535 participants is refused, naming its gtrid."""
    names = tuple(f"p{i}" for i in range(0x10000))
    with pytest.raises(UnloggableRecord, match=r"^transaction t9 has too many participants$"):
        fmt.encode(fmt.Commit("t9", names))
