"""Bad input, refused with the exact error: ids, duplicate gtrids, damaged logs, unknown names.

Every case here is fast and needs no real service: fake participants, the
in-memory decision log, and the file log on a temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google_crc32c import value as crc32c

from coordinator import failpoints
from coordinator.coordinator import Coordinator
from coordinator.errors import (
    ConfigurationError,
    DecisionLogCorrupt,
    DuplicateGtrid,
    InvalidTransition,
    InvalidXid,
    TwoPhaseCommitError,
    UnknownParticipant,
)
from coordinator.log import format as fmt
from coordinator.log.file import FileDecisionLog
from coordinator.log.memory import MemoryDecisionLog
from coordinator.states import Outcome
from coordinator.xid import (
    FORMAT_ID,
    MAX_ID_LENGTH,
    Xid,
    gtrid_prefix,
    new_gtrid,
    validate_coordinator_id,
    validate_id,
)
from participants.fake import FakeBroker, FakeResource

PREFIX = "t1."


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    """No failpoint armed before or after each test."""
    failpoints.disarm()
    yield
    failpoints.disarm()


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    """A coordinator 't1' over fake databases a and b (no broker), closed afterwards."""
    coord = Coordinator("t1", MemoryDecisionLog(), [FakeResource("a"), FakeResource("b")], None)
    yield coord
    coord.close()


# -- gtrid and bqual -------------------------------------------------------------------------------

ACCEPTED_IDS = {
    "1 character": "x",
    "63 characters": "x" * 63,
    "64 characters": "x" * 64,
    "every allowed punctuation": "a.b_c:d-e",
    "digits only": "0123456789",
}

#: value -> the message InvalidXid carries (after "gtrid " or "bqual ").
REFUSED_IDS = {
    "65 characters": ("x" * 65, r"'x{20}'\.\.\. is 65 characters long; at most 64 are allowed"),
    "65 multibyte characters": ("é" * 65, r"'é{20}'\.\.\. is 65 characters long"),
    "64 multibyte characters": ("é" * 64, r"'é{64}' contains 'é'"),
    "accented letter": (
        "transfér",
        r"'transfér' contains 'é'; only letters, digits and \. _ : - are allowed",
    ),
    "hangul": ("전송", r"'전송' contains '전'"),
    "single quote": ("it's", r"\"it's\" contains \"'\""),
    "double quote": ('say"hi"', r"'say\"hi\"' contains '\"'"),
    "SQL after a quote": (
        "x'; COMMIT PREPARED 'y",
        r"\"x'; COMMIT PREPARED 'y\" contains \"'\"",
    ),
    "NUL": ("a\x00b", r"'a\\x00b' contains '\\x00'"),
    "newline": ("a\nb", r"'a\\nb' contains '\\n'"),
    "space": ("a b", r"'a b' contains ' '"),
    "slash": ("a/b", r"'a/b' contains '/'"),
    "empty": ("", r"must not be empty"),
}

NON_STRINGS = {"int": 42, "None": None, "bytes": b"abc", "list": ["a"]}


def test_the_limit_is_sixty_four_characters() -> None:
    """The documented limit is the XA one: 64 characters."""
    assert MAX_ID_LENGTH == 64


@pytest.mark.parametrize("kind", ["gtrid", "bqual"])
@pytest.mark.parametrize("value", ACCEPTED_IDS.values(), ids=ACCEPTED_IDS.keys())
def test_well_formed_ids_are_accepted(kind: str, value: str) -> None:
    """Up to 64 letters, digits and . _ : - are accepted as gtrid and as bqual."""
    assert validate_id(kind, value) == value
    xid = Xid(FORMAT_ID, value, "a") if kind == "gtrid" else Xid(FORMAT_ID, "g", value)
    assert getattr(xid, kind) == value


@pytest.mark.parametrize("kind", ["gtrid", "bqual"])
@pytest.mark.parametrize(("value", "message"), REFUSED_IDS.values(), ids=list(REFUSED_IDS.keys()))
def test_malformed_ids_are_refused(kind: str, value: str, message: str) -> None:
    """Too long, empty, or any character outside [A-Za-z0-9._:-]: InvalidXid naming it."""
    with pytest.raises(InvalidXid, match=f"^{kind} {message}"):
        validate_id(kind, value)
    with pytest.raises(InvalidXid, match=f"^{kind} {message}"):
        Xid(FORMAT_ID, value, "a") if kind == "gtrid" else Xid(FORMAT_ID, "g", value)


@pytest.mark.parametrize("kind", ["gtrid", "bqual"])
@pytest.mark.parametrize("value", NON_STRINGS.values(), ids=NON_STRINGS.keys())
def test_non_string_ids_are_refused(kind: str, value: object) -> None:
    """A gtrid or bqual that is not a str raises InvalidXid naming its type."""
    message = f"^{kind} must be a string, not {type(value).__name__}$"
    with pytest.raises(InvalidXid, match=message):
        validate_id(kind, value)
    with pytest.raises(InvalidXid, match=message):
        Xid(FORMAT_ID, value, "a") if kind == "gtrid" else Xid(FORMAT_ID, "g", value)  # type: ignore[arg-type]


def test_invalid_xid_is_also_a_value_error() -> None:
    """InvalidXid is a ValueError too, so generic input handling catches it."""
    with pytest.raises(ValueError, match="must not be empty"):
        Xid(FORMAT_ID, "", "a")


# -- format ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("format_id", [0, 1, FORMAT_ID, 2**31 - 1])
def test_format_ids_in_range_are_accepted(format_id: int) -> None:
    """Format ids in [0, 2**31) are accepted."""
    assert Xid(format_id, "g", "b").format_id == format_id


@pytest.mark.parametrize("format_id", [-1, 2**31, 2**63, "1", 1.0, None], ids=repr)
def test_format_ids_out_of_range_or_not_integers_are_refused(format_id: object) -> None:
    """A format id outside [0, 2**31), or not an integer, raises InvalidXid."""
    message = rf"^format id {re.escape(repr(format_id))} must be an integer in \[0, 2\*\*31\)$"
    with pytest.raises(InvalidXid, match=message):
        Xid(format_id, "g", "b")  # type: ignore[arg-type]


def test_a_bool_format_id_is_refused() -> None:
    """A bool is not a format id (True is not 1 here)."""
    with pytest.raises(InvalidXid, match="format id True must be an integer"):
        Xid(True, "g", "b")


# -- coordinator ids -------------------------------------------------------------------------------

ACCEPTED_COORDINATOR_IDS = ["t1", "0", "a-b", "t1-", "a" * 24]
REFUSED_COORDINATOR_IDS = {
    "empty": "",
    "upper case": "T1",
    "leading dash": "-t1",
    "underscore": "t_1",
    "dot": "t.1",
    "25 characters": "a" * 25,
    "trailing newline": "t1\n",
    "trailing space": "t1 ",
    "hangul": "전송",
    "quote": "t1'",
    "int": 7,
    "None": None,
}


@pytest.mark.parametrize("value", ACCEPTED_COORDINATOR_IDS)
def test_well_formed_coordinator_ids_are_accepted(value: str) -> None:
    """1-24 lower-case letters, digits or dashes, not starting with a dash, are accepted."""
    assert validate_coordinator_id(value) == value
    assert gtrid_prefix(value) == value + "."
    gtrid = new_gtrid(value)
    assert gtrid.startswith(value + ".") and validate_id("gtrid", gtrid) == gtrid


@pytest.mark.parametrize(
    "value", REFUSED_COORDINATOR_IDS.values(), ids=REFUSED_COORDINATOR_IDS.keys()
)
def test_malformed_coordinator_ids_are_refused(value: object) -> None:
    """Anything else raises InvalidXid, from the validator, the prefix and the Coordinator."""
    message = (
        rf"^coordinator id {re.escape(repr(value))} must be 1-24 lower-case letters, "
        "digits or dashes, starting with a letter or digit$"
    )
    with pytest.raises(InvalidXid, match=message):
        validate_coordinator_id(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidXid, match=message):
        gtrid_prefix(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidXid, match=message):
        Coordinator(value, MemoryDecisionLog(), [FakeResource("a")])  # type: ignore[arg-type]


def test_malformed_participant_name_is_refused() -> None:
    """A participant's name becomes the bqual, so it obeys the same rules."""
    with pytest.raises(InvalidXid, match=r"^participant name '전송' contains '전'"):
        Coordinator("t1", MemoryDecisionLog(), [FakeResource("전송")])


def test_two_participants_with_one_name_are_refused() -> None:
    """Two participants named alike would share branch qualifiers: refused."""
    with pytest.raises(TwoPhaseCommitError, match=r"^two participants are named 'a'$"):
        Coordinator("t1", MemoryDecisionLog(), [FakeResource("a"), FakeResource("a")])


# -- gtrids given to Coordinator.begin -------------------------------------------------------------


@pytest.mark.parametrize("length", [len(PREFIX) + 1, 63, 64])
def test_begin_accepts_a_gtrid_up_to_sixty_four_characters(
    coordinator: Coordinator, length: int
) -> None:
    """A caller's gtrid with the coordinator's prefix and at most 64 characters is used as is."""
    gtrid = PREFIX + "x" * (length - len(PREFIX))
    tx = coordinator.begin(gtrid)
    tx.execute("a", "debit")
    tx.execute("b", "credit")
    assert tx.gtrid == gtrid and tx.branch("a").xid == Xid(FORMAT_ID, gtrid, "a")
    assert tx.commit() is Outcome.COMMITTED


@pytest.mark.parametrize(("value", "message"), REFUSED_IDS.values(), ids=list(REFUSED_IDS.keys()))
def test_begin_refuses_a_malformed_gtrid(
    coordinator: Coordinator, value: str, message: str
) -> None:
    """A malformed gtrid raises InvalidXid before any transaction exists."""
    with pytest.raises(InvalidXid, match=f"^gtrid {message}"):
        coordinator.begin(value)
    assert coordinator.active == []


def test_begin_refuses_sixty_five_characters_even_with_the_prefix(
    coordinator: Coordinator,
) -> None:
    """The prefix counts towards the 64 characters."""
    with pytest.raises(InvalidXid, match="is 65 characters long; at most 64 are allowed"):
        coordinator.begin(PREFIX + "x" * 62)


@pytest.mark.parametrize("value", [42, b"abc", ["a"]], ids=["int", "bytes", "list"])
def test_begin_refuses_a_non_string_gtrid(coordinator: Coordinator, value: object) -> None:
    """A gtrid that is not a str (None means: make one) raises InvalidXid naming its type."""
    with pytest.raises(InvalidXid, match=f"^gtrid must be a string, not {type(value).__name__}$"):
        coordinator.begin(value)  # type: ignore[arg-type]
    assert coordinator.active == []


@pytest.mark.parametrize("value", ["t2.1", "t1-1", "t11.1", "T1.1", "x"])
def test_begin_refuses_a_gtrid_without_the_coordinators_prefix(
    coordinator: Coordinator, value: str
) -> None:
    """A well-formed gtrid of another coordinator is refused: our recovery could not find it."""
    message = rf"^gtrid '{re.escape(value)}' must start with 't1\.' so that this coordinator's"
    with pytest.raises(TwoPhaseCommitError, match=message):
        coordinator.begin(value)
    assert coordinator.active == []


# -- reused gtrids ---------------------------------------------------------------------------------


def test_gtrid_of_an_active_transaction_is_refused(coordinator: Coordinator) -> None:
    """A second begin with the gtrid of a running transaction raises DuplicateGtrid."""
    tx = coordinator.begin(PREFIX + "dup")
    tx.execute("a", "debit")
    with pytest.raises(DuplicateGtrid, match=r"^gtrid t1\.dup is already in use by a transaction"):
        coordinator.begin(PREFIX + "dup")
    tx.execute("b", "credit")
    assert tx.commit() is Outcome.COMMITTED  # the first one is unharmed


def test_gtrid_logged_as_committed_but_not_ended_is_refused() -> None:
    """A gtrid with a COMMIT record and no END in the log raises DuplicateGtrid."""
    log = MemoryDecisionLog([fmt.Commit(PREFIX + "dup", ("a", "b"))])
    coord = Coordinator("t1", log, [FakeResource("a"), FakeResource("b")], recover_on_start=False)
    try:
        with pytest.raises(DuplicateGtrid, match=r"^gtrid t1\.dup is already in use"):
            coord.begin(PREFIX + "dup")
        assert coord.active == []
    finally:
        coord.close()


def test_gtrid_whose_phase_two_is_still_pending_is_refused() -> None:
    """COMMITTED with phase 2 deferred: its gtrid stays taken until phase 2 is done."""
    b = FakeResource("b")
    coord = Coordinator("t1", MemoryDecisionLog(), [FakeResource("a"), b], FakeBroker("mq"))
    coord.config.phase2_backoff = 0.0
    b.fail("commit_prepared", "error", times=3)
    try:
        tx = coord.begin(PREFIX + "dup")
        tx.execute("a", "debit")
        tx.execute("b", "credit")
        tx.send("/queue/transfers.completed", "{}")
        assert tx.commit() is Outcome.COMMITTED
        with pytest.raises(DuplicateGtrid, match=r"^gtrid t1\.dup is already in use"):
            coord.begin(PREFIX + "dup")
    finally:
        coord.close()


# -- unknown participants and misuse ---------------------------------------------------------------


def test_unknown_database_is_refused(coordinator: Coordinator) -> None:
    """A branch on a database the coordinator was not given raises UnknownParticipant."""
    tx = coordinator.begin()
    message = rf"^transaction {re.escape(tx.gtrid)}: no participant named 'c' \(known: a, b\)$"
    with pytest.raises(UnknownParticipant, match=message):
        tx.branch("c")
    with pytest.raises(UnknownParticipant, match=message):
        tx.execute("c", "debit")
    assert tx.branches == {}
    assert tx.rollback() is Outcome.ABORTED


def test_unknown_participant_is_a_key_error_with_a_readable_message(
    coordinator: Coordinator,
) -> None:
    """UnknownParticipant is a KeyError whose str() is the message, not its repr."""
    tx = coordinator.begin()
    with pytest.raises(KeyError) as caught:
        tx.branch("전송")
    assert str(caught.value).startswith(f"transaction {tx.gtrid}: no participant named '전송'")
    tx.rollback()


def test_send_without_a_broker_is_refused(coordinator: Coordinator) -> None:
    """A message on a coordinator without a broker raises UnknownParticipant."""
    tx = coordinator.begin()
    message = rf"^transaction {re.escape(tx.gtrid)}: this coordinator has no broker participant$"
    with pytest.raises(UnknownParticipant, match=message):
        tx.send("/queue/transfers.completed", "{}")
    assert tx.messages_sent == 0
    tx.rollback()


def test_ending_the_work_of_a_branch_that_cannot_is_refused(coordinator: Coordinator) -> None:
    """end_work on a branch that cannot end its work before phase 1 (a fake database here;
    PostgreSQL's can) raises InvalidTransition naming the participant and the gtrid, and the
    transaction still commits its work."""
    tx = coordinator.begin()
    tx.execute("a", "debit")
    message = rf"^transaction {re.escape(tx.gtrid)}: participant 'a' cannot end its work"
    with pytest.raises(InvalidTransition, match=message):
        tx.end_work("a")
    assert tx.commit() is Outcome.COMMITTED


def test_work_after_commit_is_refused(coordinator: Coordinator) -> None:
    """A finished transaction takes no more work and cannot be ended twice: InvalidTransition."""
    tx = coordinator.begin()
    tx.execute("a", "debit")
    assert tx.commit() is Outcome.COMMITTED
    state = rf"transaction {re.escape(tx.gtrid)} is completed$"
    with pytest.raises(InvalidTransition, match=rf"^cannot add work: {state}"):
        tx.execute("b", "credit")
    with pytest.raises(InvalidTransition, match=rf"^cannot commit: {state}"):
        tx.commit()
    with pytest.raises(InvalidTransition, match=rf"^cannot roll back: {state}"):
        tx.rollback()


def test_begin_on_a_closed_coordinator_is_refused() -> None:
    """A closed coordinator starts nothing."""
    coord = Coordinator("t1", MemoryDecisionLog(), [FakeResource("a")])
    coord.close()
    with pytest.raises(
        InvalidTransition, match=r"^cannot begin a transaction: the coordinator is closed$"
    ):
        coord.begin()


# -- failpoint settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope=raise", r"^unknown failpoint 'nope'; known: after_begin, after_prepare, "),
        ("after_begin=explode", r"^failpoint action 'explode' must be one of \('raise', 'kill'\)$"),
        ("after_begin=raise@0", r"^failpoint after_begin: on_hit must be >= 1, not 0$"),
        (
            "after_begin=raise@x",
            r"^TWOPC_FAILPOINTS item 'after_begin=raise@x': the hit count after '@' must be an "
            r"integer$",
        ),
    ],
    ids=["unknown name", "unknown action", "zero hit", "non-integer hit"],
)
def test_bad_failpoint_settings_are_refused(spec: str, message: str) -> None:
    """TWOPC_FAILPOINTS with an unknown name, action or hit count raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match=message):
        failpoints.arm_from_env(spec)
    assert not any(failpoints.is_armed(name) for name in failpoints.NAMES)


def test_failpoints_from_the_environment_need_the_test_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TWOPC_FAILPOINTS without TWOPC_TEST_FAILPOINTS=1 is refused; with it, it arms."""
    monkeypatch.setenv("TWOPC_FAILPOINTS", "after_begin=kill")
    monkeypatch.delenv("TWOPC_TEST_FAILPOINTS", raising=False)
    message = (
        r"^TWOPC_FAILPOINTS='after_begin=kill' is set, but failpoints crash the process on "
        r"purpose and are armed only in a test process that also sets TWOPC_TEST_FAILPOINTS=1"
    )
    with pytest.raises(ConfigurationError, match=message):
        failpoints.arm_from_env()
    assert not failpoints.is_armed("after_begin")
    monkeypatch.setenv("TWOPC_FAILPOINTS", "after_begin=raise")
    monkeypatch.setenv("TWOPC_TEST_FAILPOINTS", "1")
    try:
        failpoints.arm_from_env()
        assert failpoints.is_armed("after_begin")
    finally:
        failpoints.disarm()


def test_cli_refuses_failpoints_without_the_test_switch(tmp_path: Path) -> None:
    """A twopc command started with TWOPC_FAILPOINTS alone stops at once with a clear error."""
    env = {**os.environ, "TWOPC_FAILPOINTS": "after_prepare=kill", "TWOPC_HOME": str(tmp_path)}
    env.pop("TWOPC_TEST_FAILPOINTS", None)
    env.update(TWOPC_PG_A="host=127.0.0.1 port=1", TWOPC_PG_B="host=127.0.0.1 port=1")
    env.update(TWOPC_STOMP="127.0.0.1:1", TWOPC_OPENWIRE="127.0.0.1:1")
    done = subprocess.run(
        [sys.executable, "-m", "scenarios.cli", "recover"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "TWOPC_TEST_FAILPOINTS=1" in done.stderr and "Traceback" not in done.stderr


# -- decision log records --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (fmt.Commit("", ("a",)), r"^gtrid '' must be 1 to 65535 bytes of UTF-8$"),
        (fmt.End(""), r"^gtrid '' must be 1 to 65535 bytes of UTF-8$"),
        (
            fmt.Commit("t1.1", ("x" * 65536,)),
            r"^participant name 'x{20}' must be 1 to 65535 bytes of UTF-8$",
        ),
    ],
    ids=["empty gtrid", "empty gtrid in END", "participant name too long"],
)
def test_records_that_cannot_be_encoded_are_refused_before_writing(
    tmp_path: Path, record: fmt.Record, message: str
) -> None:
    """A record the format cannot hold raises ValueError, and the log is left as it was."""
    path = tmp_path / "decisions.log"
    with FileDecisionLog(path) as log:
        with pytest.raises(ValueError, match=message):
            if isinstance(record, fmt.Commit):
                log.log_commit(record.gtrid, record.participants, force=True)
            else:
                assert isinstance(record, fmt.End)
                log.log_end(record.gtrid)
        log.log_commit("t1.2", ["a"], force=True)  # still usable
    assert path.read_bytes() == fmt.HEADER + fmt.encode(fmt.Commit("t1.2", ("a",)))


# -- decision log files ----------------------------------------------------------------------------

R1 = fmt.Commit("t1.0001", ("a", "b"))
R2 = fmt.Commit("t1.0002", ("a", "mq"))
E1 = fmt.End("t1.0001")
ENCODED_R2 = fmt.encode(R2)


def frame(rtype: int, payload: bytes) -> bytes:
    """A record with a correct CRC, whatever its type and payload."""
    typed = bytes([rtype]) + payload
    return struct.pack(">I", len(payload)) + typed + struct.pack(">I", crc32c(typed))


def with_crc(record: bytes, stored: int) -> bytes:
    """``record`` with ``stored`` in place of its CRC."""
    return record[:-4] + struct.pack(">I", stored)


def write_log(path: Path, *chunks: bytes | fmt.Record) -> list[int]:
    """The header then ``chunks`` (records encoded); return each chunk's byte offset."""
    data, offsets = bytearray(fmt.HEADER), []
    for chunk in chunks:
        offsets.append(len(data))
        data += chunk if isinstance(chunk, bytes) else fmt.encode(chunk)
    path.write_bytes(bytes(data))
    return offsets


BAD_CRC = crc32c(ENCODED_R2[4:-4]) ^ 0xFFFFFFFF

FOLLOWED = r", and valid records follow it \(not a torn write\)"
ANY_CRC = r"0x[0-9a-f]{8}"

#: A damaged record between good ones: refused at its offset, for exactly this reason.
DAMAGED_IN_THE_MIDDLE = {
    "zero length": (bytes(4) + ENCODED_R2[4:], "record has a zero payload length" + FOLLOWED),
    "absurd length": (
        b"\xff\xff\xff\xf0" + ENCODED_R2[4:],
        "record length 4294967280 exceeds the maximum 268435456" + FOLLOWED,
    ),
    "length one short": (
        struct.pack(">I", len(ENCODED_R2) - 10) + ENCODED_R2[4:],
        rf"record CRC mismatch \(stored {ANY_CRC}, computed {ANY_CRC}\)" + FOLLOWED,
    ),
    "length one long": (
        struct.pack(">I", len(ENCODED_R2) - 8) + ENCODED_R2[4:],
        rf"record CRC mismatch \(stored {ANY_CRC}, computed {ANY_CRC}\)" + FOLLOWED,
    ),
    "bad CRC": (
        with_crc(ENCODED_R2, BAD_CRC),
        re.escape(
            f"record CRC mismatch (stored {BAD_CRC:#010x}, "
            f"computed {crc32c(ENCODED_R2[4:-4]):#010x})"
        )
        + FOLLOWED,
    ),
    "unknown record type": (frame(9, b"\x00\x07t1.0009"), r"unknown record type 9"),
    "payload that does not decode": (
        frame(fmt.RecordType.END, b"\x00\x09t1"),
        r"END payload does not decode: payload ends in the middle of a field",
    ),
}


@pytest.mark.parametrize(
    ("damaged", "reason"), DAMAGED_IN_THE_MIDDLE.values(), ids=DAMAGED_IN_THE_MIDDLE.keys()
)
def test_damaged_record_in_the_middle_is_refused_at_its_exact_offset(
    tmp_path: Path, damaged: bytes, reason: str
) -> None:
    """DecisionLogCorrupt carries the damaged record's byte offset; the file is untouched."""
    path = tmp_path / "decisions.log"
    offsets = write_log(path, R1, damaged, E1)
    assert offsets[1] == fmt.HEADER_SIZE + len(fmt.encode(R1)) == 36
    before = path.read_bytes()
    message = f"corrupt at byte offset 36: {reason}\\. Records after it cannot be trusted"
    with pytest.raises(DecisionLogCorrupt, match=message) as caught:
        FileDecisionLog(path)
    assert caught.value.offset == 36
    assert re.fullmatch(reason, caught.value.reason)
    assert caught.value.path == str(path)
    assert path.read_bytes() == before


#: The file's first bytes are not our header: refused at offset 0 (or 8 for the version).
BAD_HEADERS = {
    "bad magic": (
        b"NOTALOG!\x00\x01" + fmt.encode(R1),
        0,
        r"bad magic b'NOTALOG!': not a twopc decision log",
    ),
    "future version": (fmt.MAGIC + b"\x00\x02" + fmt.encode(R1), 8, r"unsupported log version 2"),
    "version zero": (fmt.MAGIC + b"\x00\x00", 8, r"unsupported log version 0"),
    "short foreign file": (b"{}\n", 0, r"file is shorter than a header and is not a log header"),
    "text file": (b"COMMIT t1.0001\n", 0, r"bad magic b'COMMIT t'"),
}


@pytest.mark.parametrize(
    ("content", "offset", "reason"), BAD_HEADERS.values(), ids=BAD_HEADERS.keys()
)
def test_file_that_is_not_a_decision_log_is_refused(
    tmp_path: Path, content: bytes, offset: int, reason: str
) -> None:
    """A file without our header raises DecisionLogCorrupt at the header, untouched."""
    path = tmp_path / "decisions.log"
    path.write_bytes(content)
    with pytest.raises(DecisionLogCorrupt, match=f"at byte offset {offset}: {reason}") as caught:
        FileDecisionLog(path)
    assert caught.value.offset == offset
    assert path.read_bytes() == content


#: Damage at the very end, nothing valid after it: a torn write, cut off on open (more cases
#: in test_decision_log.py).
TORN_TAILS = {
    "short length field": fmt.encode(E1)[:2],
    "header without payload": fmt.encode(E1)[:5],
    "bad CRC": with_crc(fmt.encode(E1), 0),
    "zero-filled block": bytes(512),
}


@pytest.mark.parametrize("tail", TORN_TAILS.values(), ids=TORN_TAILS.keys())
def test_torn_tail_is_truncated_and_the_log_opens(tmp_path: Path, tail: bytes) -> None:
    """The records before the tail are kept; the file is cut at the tail's offset."""
    path = tmp_path / "decisions.log"
    offsets = write_log(path, R1, R2, tail)
    with FileDecisionLog(path) as log:
        assert log.pending() == {R1.gtrid: R1.participants, R2.gtrid: R2.participants}
    assert path.stat().st_size == offsets[2] == 63


@pytest.mark.parametrize(
    "content", [b"", fmt.HEADER[:1], fmt.HEADER[:9]], ids=["zero length", "1 byte", "9 bytes"]
)
def test_empty_or_torn_header_file_is_a_fresh_log(tmp_path: Path, content: bytes) -> None:
    """A zero-length file, or a prefix of the header, opens as a new, empty log."""
    path = tmp_path / "decisions.log"
    path.write_bytes(content)
    with FileDecisionLog(path) as log:
        assert log.pending() == {}
        log.log_commit("t1.0001", ["a", "b"], force=True)
    assert path.read_bytes() == fmt.HEADER + fmt.encode(fmt.Commit("t1.0001", ("a", "b")))


def test_corrupt_log_message_tells_the_operator_what_to_do(tmp_path: Path) -> None:
    """The refusal names the file and the offset, says the coordinator will not start, and why."""
    path = tmp_path / "decisions.log"
    write_log(path, R1, with_crc(ENCODED_R2, BAD_CRC), E1)
    with pytest.raises(DecisionLogCorrupt) as caught:
        FileDecisionLog(path)
    assert str(caught.value).startswith(f"decision log {path} is corrupt at byte offset 36: ")
    assert str(caught.value).endswith(
        ". Records after it cannot be trusted, so the coordinator refuses to start. "
        "Keep a copy of the file, look at it with 'twopc log dump', and once you know what "
        "the records after the damage decided, cut it there with "
        "'twopc log truncate --at 36 --i-know' (see docs/operations.md, 'The decision log')."
    )


# -- the decision log from the outside: twopc log dump | verify | truncate ----------------------


def twopc_log(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``twopc log ARGS`` on the decision log in ``home``."""
    return subprocess.run(
        [sys.executable, "-m", "scenarios.cli", "log", *args],
        env={**os.environ, "TWOPC_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_log_dump_shows_every_record_and_the_damage_with_offsets(tmp_path: Path) -> None:
    """dump lists each record and a damaged stretch at their byte offsets, past the damage."""
    offsets = write_log(tmp_path / "decisions.log", R1, with_crc(ENCODED_R2, BAD_CRC), E1)
    done = twopc_log(tmp_path, "dump", "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)["entries"]
    assert [(e["offset"], e["type"]) for e in entries] == [
        (offsets[0], "COMMIT"),
        (offsets[1], "DAMAGED"),
        (offsets[2], "END"),
    ]
    assert entries[0]["gtrid"] == R1.gtrid and entries[0]["participants"] == ["a", "b"]
    assert entries[1]["problem"].startswith("record CRC mismatch")


def test_log_verify_passes_a_clean_log_and_a_torn_tail(tmp_path: Path) -> None:
    """verify exits 0 for intact records, and for a torn tail that the next open truncates."""
    path = tmp_path / "decisions.log"
    write_log(path, R1, E1)
    clean = twopc_log(tmp_path, "verify")
    assert clean.returncode == 0 and "2 records, all intact; 0 COMMIT without END" in clean.stdout
    write_log(path, R1, ENCODED_R2[:-3])
    torn = twopc_log(tmp_path, "verify")
    assert torn.returncode == 0 and "then a torn tail at byte offset 36" in torn.stdout


def test_log_verify_fails_on_damage_in_the_middle_and_names_the_repair(tmp_path: Path) -> None:
    """verify exits 1 on mid-log damage and names the offset and the truncate command."""
    write_log(tmp_path / "decisions.log", R1, with_crc(ENCODED_R2, BAD_CRC), E1)
    done = twopc_log(tmp_path, "verify")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "damaged at byte offset 36: record CRC mismatch" in done.stderr
    assert "'twopc log truncate --at 36 --i-know'" in done.stderr


def test_log_truncate_needs_i_know_then_cuts_at_a_record_start(tmp_path: Path) -> None:
    """Without --i-know nothing changes (usage error); with it the log opens again, shorter."""
    path = tmp_path / "decisions.log"
    write_log(path, R1, with_crc(ENCODED_R2, BAD_CRC), E1)
    before = path.read_bytes()
    refused = twopc_log(tmp_path, "truncate", "--at", "36")
    assert refused.returncode == 2 and "add --i-know" in refused.stderr
    assert path.read_bytes() == before
    inside = twopc_log(tmp_path, "truncate", "--at", "37", "--i-know")
    assert inside.returncode == 1 and "is inside a record" in inside.stderr
    done = twopc_log(tmp_path, "truncate", "--at", "36", "--i-know")
    assert done.returncode == 0 and "2 entries dropped" in done.stdout
    assert path.read_bytes() == before[:36]
    with FileDecisionLog(path) as log:
        assert log.pending() == {R1.gtrid: R1.participants}


def test_log_truncate_is_refused_while_a_coordinator_holds_the_log(tmp_path: Path) -> None:
    """truncate takes the log's lock: with a coordinator on the log it changes nothing."""
    path = tmp_path / "decisions.log"
    with FileDecisionLog(path) as log:
        log.log_commit(R1.gtrid, R1.participants, force=True)
        size = path.stat().st_size
        done = twopc_log(tmp_path, "truncate", "--at", str(fmt.HEADER_SIZE), "--i-know")
        assert done.returncode == 1 and "is locked by process" in done.stderr
        assert path.stat().st_size == size
