"""The decision log: format, torn tails and corruption, locking, fsync, group commit, compaction."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from google_crc32c import value as crc32c

from coordinator import failpoints
from coordinator.errors import (
    CrashInjected,
    DecisionLogCorrupt,
    DecisionLogError,
    DecisionLogLocked,
    FsyncFailed,
)
from coordinator.log import DecisionLog
from coordinator.log import format as fmt
from coordinator.log.file import LOCK_SUFFIX, REPLACEMENT_SUFFIX, FileDecisionLog
from coordinator.log.memory import MemoryDecisionLog

R1 = fmt.Commit("tx-1", ("pg-a", "pg-b"))
R2 = fmt.Commit("tx-2", ("pg-a", "mq"))
R3 = fmt.End("tx-1")


@pytest.fixture(autouse=True)
def _disarm_failpoints() -> Iterator[None]:
    yield
    failpoints.disarm()


def write_image(path: Path, *chunks: bytes | fmt.Record) -> list[int]:
    """Write header + chunks (records are encoded); return each chunk's offset."""
    offsets, data = [], bytearray(fmt.HEADER)
    for chunk in chunks:
        offsets.append(len(data))
        data += fmt.encode(chunk) if not isinstance(chunk, bytes) else chunk
    path.write_bytes(bytes(data))
    return offsets


def raw_frame(rtype: int, payload: bytes) -> bytes:
    """A frame with a correct CRC, whatever the type and payload."""
    typed = bytes([rtype]) + payload
    return struct.pack(">I", len(payload)) + typed + struct.pack(">I", crc32c(typed))


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


class Disk:
    """An fsync stand-in: counts calls, can fail, and keeps the image each call made durable."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.broken = False
        self.failing_after = threading.Event()  # a broken disk fails once this is set
        self.failing_after.set()
        self.durable = b""
        self._lock = threading.Lock()

    def fsync(self, fd: int) -> None:
        # What was written before the call is what the call makes durable.
        image = os.pread(fd, os.fstat(fd).st_size, 0)
        with self._lock:
            self.calls += 1
        if self.broken:
            self.failing_after.wait(10)
            raise OSError(errno.EIO, "Input/output error")
        time.sleep(self.delay)
        with self._lock:
            if len(image) > len(self.durable):
                self.durable = image


def run_child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- the protocol, on both implementations -----------------------------------------


@pytest.fixture(params=["file", "memory"])
def any_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DecisionLog]:
    log: DecisionLog
    if request.param == "file":
        log = FileDecisionLog(tmp_path / "decisions.log")
    else:
        log = MemoryDecisionLog()
    yield log
    log.close()


def test_pending_lists_commits_without_end(any_log: DecisionLog) -> None:
    """pending() holds every COMMIT not followed by an END, with its participants."""
    any_log.log_commit("tx-1", ["pg-a", "pg-b"], force=True)
    any_log.log_commit("tx-2", ["pg-a"], force=False)
    any_log.log_end("tx-1")
    assert any_log.pending() == {"tx-2": ("pg-a",)}


def test_one_forced_write_per_forced_commit_and_none_for_lazy_records(
    any_log: DecisionLog,
) -> None:
    """A lone forced commit costs one forced write; END and lazy commits cost none."""
    any_log.log_commit("tx-1", ["pg-a"], force=True)
    any_log.log_commit("tx-2", ["pg-a"], force=False)
    any_log.log_end("tx-1")
    assert any_log.forced_writes == 1
    any_log.log_commit("tx-3", ["pg-a"], force=True)
    assert any_log.forced_writes == 2
    any_log.flush()
    assert any_log.forced_writes == 2  # nothing new to sync


def test_closed_log_refuses_calls(any_log: DecisionLog) -> None:
    """After close() every call raises DecisionLogError; close() itself is idempotent."""
    any_log.close()
    any_log.close()
    with pytest.raises(DecisionLogError):
        any_log.log_commit("tx-1", ["pg-a"], force=True)
    with pytest.raises(DecisionLogError):
        any_log.pending()


# -- file log: round trip and lazy records -------------------------------------------


def test_round_trip_through_reopen(tmp_path: Path) -> None:
    """Commits and ends logged before close() give the same pending set after reopening."""
    path = tmp_path / "decisions.log"
    with FileDecisionLog(path) as log:
        log.log_commit("tx-1", ["pg-a", "pg-b", "mq"], force=True)
        log.log_commit("tx-2", ["pg-a"], force=False)
        log.log_commit("tx-3", ["pg-b"], force=True)
        log.log_end("tx-2")
    with FileDecisionLog(path) as log:
        assert log.pending() == {"tx-1": ("pg-a", "pg-b", "mq"), "tx-3": ("pg-b",)}
        assert log.forced_writes == 0  # opening is not counted


def test_new_log_creates_missing_parent_directories(tmp_path: Path) -> None:
    """Opening a log under missing directories creates them and a header-only log."""
    path = tmp_path / "a" / "b" / "decisions.log"
    FileDecisionLog(path).close()
    assert path.read_bytes() == fmt.HEADER


def test_lazy_records_become_durable_with_the_next_forced_write(tmp_path: Path) -> None:
    """log_end and lazy commits are not synced by themselves; the next force syncs them."""
    disk = Disk()
    with FileDecisionLog(tmp_path / "decisions.log", fsync=disk.fsync) as log:
        synced = disk.calls
        log.log_commit("tx-lazy", ["pg-a"], force=False)
        log.log_end("tx-old")
        assert disk.calls == synced
        log.log_commit("tx-forced", ["pg-a"], force=True)
        assert disk.calls == synced + 1
        assert b"tx-lazy" in disk.durable and b"tx-old" in disk.durable


def test_opening_makes_what_it_read_durable_before_anyone_acts_on_it(tmp_path: Path) -> None:
    """Records a dead process wrote but never synced are synced by the next open."""
    path = tmp_path / "decisions.log"
    dead = FileDecisionLog(path, fsync=Disk().fsync)
    dead.log_commit("tx-unsynced", ["pg-a", "pg-b"], force=False)  # in the page cache only
    dead.abandon()
    disk = Disk()
    with FileDecisionLog(path, fsync=disk.fsync) as log:
        assert log.pending() == {"tx-unsynced": ("pg-a", "pg-b")}
        assert b"tx-unsynced" in disk.durable  # synced before pending() could be acted on


# -- torn tails and corruption --------------------------------------------------------


TORN_TAILS: dict[str, Callable[[bytes], bytes]] = {
    "short length": lambda record: record[:2],
    "short header": lambda record: record[:6],
    "short payload": lambda record: record[:-6],
    "missing crc": lambda record: record[:-4],
    "bad crc": lambda record: flip(record, len(record) - 1),
    "bad payload byte": lambda record: flip(record, 7),
    "length past eof": lambda record: struct.pack(">I", len(record)) + record[4:],
    "zero-filled blocks": lambda record: bytes(4096),
}


@pytest.mark.parametrize("tear", TORN_TAILS.values(), ids=TORN_TAILS.keys())
def test_torn_tail_is_truncated_on_open(tmp_path: Path, tear: Callable[[bytes], bytes]) -> None:
    """A damaged last record with nothing valid after it is cut off; the file shrinks."""
    path = tmp_path / "decisions.log"
    offsets = write_image(path, R1, R2, tear(fmt.encode(R3)))
    with FileDecisionLog(path) as log:
        assert log.pending() == {"tx-1": R1.participants, "tx-2": R2.participants}
    assert path.stat().st_size == offsets[2]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "bad payload byte": lambda record: flip(record, 7),
    "bad crc": lambda record: flip(record, len(record) - 1),
    "bad type byte": lambda record: flip(record, 4),
    "zero length": lambda record: bytes(4) + record[4:],
    "absurd length": lambda record: b"\xff\xff\xff\xf0" + record[4:],
    "length one too long": lambda record: struct.pack(">I", len(record) - 8) + record[4:],
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_record_in_the_middle_is_refused_at_its_offset(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    """A damaged record followed by a valid one raises DecisionLogCorrupt at its offset."""
    path = tmp_path / "decisions.log"
    offsets = write_image(path, R1, damage(fmt.encode(R2)), R3)
    before = path.read_bytes()
    with pytest.raises(DecisionLogCorrupt) as caught:
        FileDecisionLog(path)
    assert caught.value.offset == offsets[1]
    assert f"offset {offsets[1]}" in str(caught.value)
    assert path.read_bytes() == before  # nothing truncated
    with pytest.raises(DecisionLogCorrupt):  # not DecisionLogLocked: the refusal let go
        FileDecisionLog(path)


@pytest.mark.parametrize("where", ["middle", "end"])
def test_unknown_record_type_is_refused_even_at_the_end(tmp_path: Path, where: str) -> None:
    """A well-framed record of an unknown type is never taken for a torn write."""
    path = tmp_path / "decisions.log"
    unknown = raw_frame(9, b"\x00\x04tx-9")
    chunks: list[bytes | fmt.Record] = [R1, unknown, R2] if where == "middle" else [R1, R2, unknown]
    offsets = write_image(path, *chunks)
    with pytest.raises(DecisionLogCorrupt, match="unknown record type 9") as caught:
        FileDecisionLog(path)
    assert caught.value.offset == offsets[chunks.index(unknown)]


def test_well_framed_record_whose_payload_does_not_decode_is_refused(tmp_path: Path) -> None:
    """A record with a good CRC but a payload that does not parse is corruption, not a tear."""
    path = tmp_path / "decisions.log"
    offsets = write_image(path, R1, raw_frame(fmt.RecordType.END, b"\x00\x09tx"))
    with pytest.raises(DecisionLogCorrupt, match="END payload does not decode") as caught:
        FileDecisionLog(path)
    assert caught.value.offset == offsets[1]


def test_empty_file_is_a_fresh_log(tmp_path: Path) -> None:
    """A zero-length file is initialised with a header and has nothing pending."""
    path = tmp_path / "decisions.log"
    path.write_bytes(b"")
    with FileDecisionLog(path) as log:
        assert log.pending() == {}
    assert path.read_bytes() == fmt.HEADER


def test_torn_header_is_reinitialised(tmp_path: Path) -> None:
    """A file shorter than the header that is a prefix of it is a log never initialised."""
    path = tmp_path / "decisions.log"
    path.write_bytes(fmt.HEADER[:5])
    FileDecisionLog(path).close()
    assert path.read_bytes() == fmt.HEADER


@pytest.mark.parametrize(
    ("content", "offset", "reason"),
    [
        (b"hello", 0, "not a log header"),
        (b"NOTALOG!\x00\x01" + fmt.encode(R1), 0, "bad magic"),
        (fmt.MAGIC + b"\x00\x07", 8, "unsupported log version 7"),
    ],
    ids=["short foreign file", "bad magic", "future version"],
)
def test_foreign_or_future_header_is_refused(
    tmp_path: Path, content: bytes, offset: int, reason: str
) -> None:
    """A file that does not start with our header raises DecisionLogCorrupt, untouched."""
    path = tmp_path / "decisions.log"
    path.write_bytes(content)
    with pytest.raises(DecisionLogCorrupt, match=reason) as caught:
        FileDecisionLog(path)
    assert caught.value.offset == offset
    assert path.read_bytes() == content


def test_unopenable_path_raises_a_decision_log_error(tmp_path: Path) -> None:
    """An OS error while opening is translated into DecisionLogError naming the path."""
    with pytest.raises(DecisionLogError, match=f"cannot open decision log {tmp_path}"):
        FileDecisionLog(tmp_path)  # a directory


# -- fsync failure -------------------------------------------------------------------


def test_fsync_failure_is_fatal_and_never_retried(tmp_path: Path) -> None:
    """A failed fsync raises FsyncFailed, and so does every later call, with no new fsync."""
    disk = Disk()
    path = tmp_path / "decisions.log"
    log = FileDecisionLog(path, fsync=disk.fsync)
    disk.broken = True
    with pytest.raises(FsyncFailed, match="Input/output error"):
        log.log_commit("tx-1", ["pg-a"], force=True)
    calls = disk.calls
    for call in (
        lambda: log.log_commit("tx-2", ["pg-a"], force=True),
        lambda: log.log_commit("tx-3", ["pg-a"], force=False),
        lambda: log.log_end("tx-1"),
        log.flush,
        log.pending,
    ):
        with pytest.raises(FsyncFailed):
            call()
    assert disk.calls == calls
    log.close()  # does not sync, does not raise, releases the lock
    assert disk.calls == calls
    FileDecisionLog(path).close()


def test_fsync_failure_fails_the_waiting_followers_too(tmp_path: Path) -> None:
    """Callers waiting on a failed leader's fsync get FsyncFailed, without their own fsync."""
    disk = Disk()
    path = tmp_path / "decisions.log"
    log = FileDecisionLog(path, fsync=disk.fsync)
    disk.broken = True
    disk.failing_after.clear()  # the leader's fsync hangs until the followers queue up
    calls = disk.calls
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(log.log_commit, f"tx-{i}", ["pg-a"], force=True) for i in range(3)]
        three_records = fmt.HEADER_SIZE + 3 * len(fmt.encode(fmt.Commit("tx-0", ("pg-a",))))
        while path.stat().st_size < three_records:
            time.sleep(0.001)
        disk.failing_after.set()
        for future in futures:
            with pytest.raises(FsyncFailed):
                future.result()
    assert disk.calls == calls + 1
    log.close()


# -- locking -------------------------------------------------------------------------


def test_second_instance_in_the_same_process_is_locked_out(tmp_path: Path) -> None:
    """A second FileDecisionLog on the same path raises DecisionLogLocked naming our pid."""
    path = tmp_path / "decisions.log"
    first = FileDecisionLog(path)
    with pytest.raises(DecisionLogLocked, match=f"locked by process {os.getpid()}") as caught:
        FileDecisionLog(path)
    assert "another coordinator is running" in str(caught.value)
    assert "Stop that process first" in str(caught.value)
    first.close()
    FileDecisionLog(path).close()


_TRY_OPEN = """
import sys
from coordinator.errors import DecisionLogLocked
from coordinator.log.file import FileDecisionLog
try:
    FileDecisionLog(sys.argv[1])
except DecisionLogLocked as exc:
    print(exc)
    sys.exit(3)
"""


def test_second_process_is_locked_out(tmp_path: Path) -> None:
    """Another process opening a held log gets DecisionLogLocked naming the holder's pid."""
    path = tmp_path / "decisions.log"
    with FileDecisionLog(path):
        child = run_child(_TRY_OPEN, str(path))
        out, err = child.communicate(timeout=30)
    assert child.returncode == 3, err
    assert f"locked by process {os.getpid()}" in out


_HOLD = """
import sys, time
from coordinator.log.file import FileDecisionLog
log = FileDecisionLog(sys.argv[1])
print("holding", flush=True)
time.sleep(60)
"""


def test_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the holding process frees the log: flock leaves no stale lock."""
    path = tmp_path / "decisions.log"
    child = run_child(_HOLD, str(path))
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "holding\n"
        with pytest.raises(DecisionLogLocked, match=f"locked by process {child.pid}"):
            FileDecisionLog(path)
    finally:
        child.kill()
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    FileDecisionLog(path).close()
    assert (tmp_path / ("decisions.log" + LOCK_SUFFIX)).exists()  # the lock file stays


# -- group commit --------------------------------------------------------------------


def test_concurrent_forced_commits_share_fsyncs(tmp_path: Path) -> None:
    """32 threads x 50 forced commits share fsyncs, and none returns before its own is synced."""
    disk = Disk(delay=0.001)
    threads, per_thread = 32, 50
    log = FileDecisionLog(tmp_path / "decisions.log", fsync=disk.fsync)

    def commit_many(thread: int) -> None:
        for i in range(per_thread):
            gtrid = f"tx-{thread:02d}-{i:03d}"
            log.log_commit(gtrid, ["pg-a", "pg-b"], force=True)
            assert gtrid.encode() in disk.durable, f"{gtrid} acknowledged before it was synced"

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(commit_many, t) for t in range(threads)]:
            future.result()
    commits = threads * per_thread
    # Without sharing every commit needs its own fsync (ratio 1).
    assert log.forced_writes / commits < 0.5
    assert len(log.pending()) == commits
    log.close()


# -- compaction ----------------------------------------------------------------------


def test_compaction_keeps_pending_drops_ended_and_shrinks_the_file(tmp_path: Path) -> None:
    """Past the threshold the log is rewritten as one CHECKPOINT of the pending set."""
    path = tmp_path / "decisions.log"
    expected = {}
    with FileDecisionLog(path, compact_threshold_bytes=2048) as log:
        for i in range(200):
            log.log_commit(f"tx-{i:03d}", ["pg-a", "pg-b"], force=False)
            if i % 10:
                log.log_end(f"tx-{i:03d}")
            else:
                expected[f"tx-{i:03d}"] = ("pg-a", "pg-b")
        assert log.forced_writes >= 2  # each compaction syncs its new file
        assert log.pending() == expected
        assert path.stat().st_size <= 2048
    found = fmt.scan(path.read_bytes(), str(path))
    assert isinstance(found.records[0], fmt.Checkpoint)
    with FileDecisionLog(path) as log:
        assert log.pending() == expected


def test_compaction_under_concurrent_commits_loses_nothing(tmp_path: Path) -> None:
    """Threads committing and ending while compaction swaps the file keep a correct log."""
    path = tmp_path / "decisions.log"
    disk = Disk(delay=0.0002)
    log = FileDecisionLog(path, compact_threshold_bytes=1024, fsync=disk.fsync)

    def work(thread: int) -> None:
        for i in range(100):
            log.log_commit(f"tx-{thread}-{i:03d}", ["pg-a"], force=True)
            if i % 4:
                log.log_end(f"tx-{thread}-{i:03d}")

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, t) for t in range(8)]:
            future.result()
    expected = {f"tx-{t}-{i:03d}": ("pg-a",) for t in range(8) for i in range(0, 100, 4)}
    assert log.pending() == expected
    log.close()
    with FileDecisionLog(path, compact_threshold_bytes=1024) as reopened:
        assert reopened.pending() == expected


def test_compaction_stays_rare_when_the_pending_set_exceeds_the_threshold(
    tmp_path: Path,
) -> None:
    """A pending set larger than the threshold does not make every append compact."""
    with FileDecisionLog(tmp_path / "decisions.log", compact_threshold_bytes=512) as log:
        for i in range(300):
            log.log_commit(f"tx-{i:03d}", ["pg-a"], force=False)
        assert 1 <= log.forced_writes <= 8  # about log2(final size / threshold) compactions
        assert len(log.pending()) == 300


def test_oversized_log_is_compacted_on_open(tmp_path: Path) -> None:
    """A log past the threshold when opened is compacted before use."""
    path = tmp_path / "decisions.log"
    with FileDecisionLog(path) as log:
        for i in range(100):
            log.log_commit(f"tx-{i:03d}", ["pg-a"], force=False)
            log.log_end(f"tx-{i:03d}")
        log.log_commit("tx-kept", ["pg-a"], force=True)
    with FileDecisionLog(path, compact_threshold_bytes=256) as log:
        assert log.pending() == {"tx-kept": ("pg-a",)}
    assert path.read_bytes() == fmt.HEADER + fmt.encode(
        fmt.Checkpoint((fmt.Commit("tx-kept", ("pg-a",)),))
    )


@pytest.mark.parametrize("debris", ["partial", "complete"])
def test_leftover_replacement_file_is_discarded_on_open(tmp_path: Path, debris: str) -> None:
    """A crash before the rename leaves the old log whole: open uses it and drops the debris."""
    path = tmp_path / "decisions.log"
    write_image(path, R1, R2)
    replacement = tmp_path / ("decisions.log" + REPLACEMENT_SUFFIX)
    other = fmt.HEADER + fmt.encode(fmt.Checkpoint((fmt.Commit("tx-other", ("pg-a",)),)))
    replacement.write_bytes(other[:7] if debris == "partial" else other)
    with FileDecisionLog(path) as log:
        assert log.pending() == {"tx-1": R1.participants, "tx-2": R2.participants}
    assert not replacement.exists()


def test_crash_while_compacting_leaves_the_old_log_valid(tmp_path: Path) -> None:
    """A crash when the compacted file is written but not yet renamed loses nothing."""
    path = tmp_path / "decisions.log"
    replacement = str(path.resolve()) + REPLACEMENT_SUFFIX

    def crash_on_replacement(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == replacement:
            raise CrashInjected("crash while compacting")
        os.fsync(fd)

    with FileDecisionLog(path) as log:
        log.log_commit("tx-kept", ["pg-a"], force=True)
    log = FileDecisionLog(path, compact_threshold_bytes=512, fsync=crash_on_replacement)
    expected = {"tx-kept": ("pg-a",)}
    with pytest.raises(CrashInjected):
        # A record is appended before the compaction it triggers, so it survives the crash.
        for i in range(100):
            expected[f"tx-{i:03d}"] = ("pg-a",)
            log.log_commit(f"tx-{i:03d}", ["pg-a"], force=False)
            del expected[f"tx-{i:03d}"]
            log.log_end(f"tx-{i:03d}")
    assert os.path.exists(replacement)
    with FileDecisionLog(path, compact_threshold_bytes=1 << 20) as reopened:
        assert reopened.pending() == expected
    assert not os.path.exists(replacement)


# -- failpoints ----------------------------------------------------------------------


_COMMIT_THEN_CRASH = """
import sys
from coordinator import failpoints
from coordinator.log.file import FileDecisionLog
log = FileDecisionLog(sys.argv[1])
log.log_commit("tx-before", ["pg-a"], force=True)
failpoints.arm(sys.argv[2], "kill")
log.log_commit("tx-doomed", ["pg-a", "pg-b"], force=True)
print("not killed")
"""


def test_torn_record_failpoint_kill_leaves_a_torn_tail_that_reopen_truncates(
    tmp_path: Path,
) -> None:
    """Killed halfway through a forced COMMIT: reopen cuts the half record; not pending."""
    path = tmp_path / "decisions.log"
    child = run_child(_COMMIT_THEN_CRASH, str(path), "log_torn_record")
    out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, (out, err)
    good_end = fmt.HEADER_SIZE + len(fmt.encode(fmt.Commit("tx-before", ("pg-a",))))
    doomed = fmt.encode(fmt.Commit("tx-doomed", ("pg-a", "pg-b")))
    assert path.stat().st_size == good_end + len(doomed) // 2
    with FileDecisionLog(path) as log:
        assert log.pending() == {"tx-before": ("pg-a",)}
    assert path.stat().st_size == good_end


def test_unsynced_record_failpoint_kill_keeps_the_written_record(tmp_path: Path) -> None:
    """Killed after writing a forced COMMIT but before its fsync: the record is whole.

    A process crash loses nothing the kernel already has; only a machine crash
    loses unsynced data (MemoryDecisionLog.crash() models that).
    """
    path = tmp_path / "decisions.log"
    child = run_child(_COMMIT_THEN_CRASH, str(path), "log_unsynced_record")
    out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, (out, err)
    size = path.stat().st_size
    with FileDecisionLog(path) as log:
        assert log.pending() == {"tx-before": ("pg-a",), "tx-doomed": ("pg-a", "pg-b")}
    assert path.stat().st_size == size


def test_torn_record_failpoint_raise_abandons_the_log(tmp_path: Path) -> None:
    """Armed with 'raise', the crash propagates, the log is dropped and reopen truncates."""
    path = tmp_path / "decisions.log"
    log = FileDecisionLog(path)
    log.log_commit("tx-before", ["pg-a"], force=True)
    size = path.stat().st_size
    failpoints.arm("log_torn_record", "raise")
    with pytest.raises(CrashInjected):
        log.log_commit("tx-doomed", ["pg-a"], force=True)
    with pytest.raises(DecisionLogError, match="injected crash"):
        log.pending()
    with FileDecisionLog(path) as reopened:  # the crashed instance released the lock
        assert reopened.pending() == {"tx-before": ("pg-a",)}
    assert path.stat().st_size == size


def test_lazy_commit_does_not_pass_the_forced_write_failpoints(tmp_path: Path) -> None:
    """The torn and unsynced failpoints belong to forced COMMITs only."""
    failpoints.arm("log_torn_record", "raise")
    failpoints.arm("log_unsynced_record", "raise")
    with FileDecisionLog(tmp_path / "decisions.log") as log:
        log.log_commit("tx-lazy", ["pg-a"], force=False)
        log.log_end("tx-lazy")
    assert failpoints.is_armed("log_torn_record") and failpoints.is_armed("log_unsynced_record")


# -- memory log crashes ----------------------------------------------------------------


def test_memory_crash_keeps_only_forced_records() -> None:
    """crash() loses what was not forced; reopen() (a process crash) keeps all written."""
    log = MemoryDecisionLog()
    log.log_commit("tx-1", ["pg-a"], force=True)
    log.log_commit("tx-2", ["pg-b"], force=False)
    log.log_end("tx-1")
    assert log.reopen().pending() == {"tx-2": ("pg-b",)}
    assert log.crash().pending() == {"tx-1": ("pg-a",)}
    with pytest.raises(DecisionLogError):
        log.pending()


def test_memory_tear_tail_drops_only_an_unforced_last_record() -> None:
    """tear_tail() removes the last record if it is not forced, and never a forced one."""
    log = MemoryDecisionLog()
    log.log_commit("tx-1", ["pg-a"], force=True)
    log.log_end("tx-1")
    assert log.tear_tail() is True
    assert log.pending() == {"tx-1": ("pg-a",)}
    assert log.tear_tail() is False
    assert log.records == (fmt.Commit("tx-1", ("pg-a",)),)


@pytest.mark.parametrize(
    ("failpoint", "after_reopen"),
    [("log_torn_record", {}), ("log_unsynced_record", {"tx-1": ("pg-a",)})],
)
def test_memory_log_passes_the_same_failpoints(
    failpoint: str, after_reopen: dict[str, tuple[str, ...]]
) -> None:
    """A torn COMMIT is absent after a crash; an unsynced one survives only a process crash."""
    log = MemoryDecisionLog()
    failpoints.arm(failpoint, "raise")
    with pytest.raises(CrashInjected):
        log.log_commit("tx-1", ["pg-a"], force=True)
    assert log.reopen().pending() == after_reopen
    assert log.crash().pending() == {}


def test_new_log_and_lock_are_owner_only(tmp_path: Path) -> None:
    """A new log and its lock file are 0600, and the folders the log creates are 0700."""
    path = tmp_path / "state" / "decisions.log"
    with FileDecisionLog(path, compact_threshold_bytes=200) as log:
        for i in range(20):  # past the threshold: a compaction replaces the file
            log.log_commit(f"g{i}", ["a", "b"], force=True)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (Path(f"{path}{LOCK_SUFFIX}").stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_open_tightens_an_existing_log_and_lock(tmp_path: Path) -> None:
    """Opening a log left world-readable by an older version makes it and its lock 0600."""
    path = tmp_path / "decisions.log"
    FileDecisionLog(path).close()
    lock = Path(f"{path}{LOCK_SUFFIX}")
    path.chmod(0o644)
    lock.chmod(0o666)
    with FileDecisionLog(path) as log:
        assert log.pending() == {}
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (lock.stat().st_mode & 0o777) == 0o600
