"""FileDecisionLog: the decision log as an append-only file, with group commit and compaction.

Files, for a log at ``PATH``:

- ``PATH`` -- the log (layout in format.py), opened O_APPEND: one os.write per record.
- ``PATH.lock`` -- holds the flock that admits one coordinator per log, and its pid.
  It is never renamed, so the lock survives compaction replacing ``PATH``; the
  kernel drops the lock when its holder dies, so a killed process leaves none.
- ``PATH.compact`` -- a replacement being built (a new log, or a compaction);
  renamed over ``PATH`` once synced. A leftover one is an interrupted
  replacement: ``PATH`` is still whole, so open deletes it.

Each file is created with mode 0600 (owner only: the log names every
transaction), and open tightens an existing log or lock file to 0600;
directories the log creates are 0700.

Durability: records are written at once and become durable in :meth:`_force`,
the only place that calls fsync. Forced commits share fsyncs (group commit):
a caller whose record is not yet durable either becomes the leader and syncs
everything written so far, or waits for the leader in flight. An fsync
failure is fatal: the log refuses every later call, because a retried fsync
can report success for pages the kernel already dropped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Sequence
from types import TracebackType

from coordinator import events, failpoints
from coordinator.errors import (
    CrashInjected,
    DecisionLogError,
    DecisionLogLocked,
    FsyncFailed,
    RecordNotDurable,
)
from coordinator.log import format as fmt

DEFAULT_COMPACT_THRESHOLD = 4 * 1024 * 1024
FILE_MODE = 0o600  # the log, its lock and a replacement: the owner only
DIRECTORY_MODE = 0o700  # directories the log creates
LOCK_SUFFIX = ".lock"
REPLACEMENT_SUFFIX = ".compact"


class FileDecisionLog:
    """The decision log in one file; one open instance per file, across all processes.

    Opening takes the lock (DecisionLogLocked if another process or instance
    holds it), truncates a torn tail, refuses a corrupt log
    (DecisionLogCorrupt) and compacts it if it is past the threshold.
    ``fsync`` is what makes the file durable: ``os.fsync``, ``os.fdatasync``,
    or a test's stand-in.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        compact_threshold_bytes: int = DEFAULT_COMPACT_THRESHOLD,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.path = os.fspath(path)
        self._fsync = fsync
        self._threshold = compact_threshold_bytes
        # Guards all state below; followers of a group commit wait on it. The appends take
        # the lock itself (a C-level with), the same lock the condition waits with.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._crash_guard = _CrashGuard(self)
        self._unusable: tuple[type[DecisionLogError], str] | None = None
        self._forced_writes = 0
        self._written_lsn = 0  # bytes appended since open (survives compaction, unlike offsets)
        self._durable_lsn = 0  # ... of which fsync'd
        self._flushing = False  # a leader is in fsync, outside the lock
        self._lock_fd: int | None = None
        self._fd: int | None = None
        try:
            self._make_parent_dirs()
            self._lock_fd = _take_lock(self.path)
            self._fd, self._size, self._pending = self._open_or_create()
            self._compact_at = self._threshold
            with self._cond:
                self._maybe_compact()
        except BaseException as exc:
            self._release()
            if isinstance(exc, OSError):
                raise DecisionLogError(f"cannot open decision log {self.path}: {exc}") from exc
            raise
        self._forced_writes = 0  # count what the log does once open, not the opening

    # -- the DecisionLog protocol ----------------------------------------------

    def log_commit(self, gtrid: str, participants: Sequence[str], *, force: bool) -> None:
        """Append COMMIT(gtrid, participants); with ``force``, return once it is durable."""
        commit = fmt.Commit(gtrid, tuple(participants))
        data = fmt.encode(commit)
        with self._mutex, self._crash_guard:
            self._check_usable()
            lsn = self._append(data, may_tear=force)
            fmt.apply(self._pending, commit)
            try:
                if force:
                    failpoints.hit("log_unsynced_record")
                self._maybe_compact()
                if force:
                    self._wait_durable(lsn)
            except DecisionLogError as exc:  # the log is unusable now (see _force)
                raise RecordNotDurable(
                    f"the COMMIT record of {gtrid} was written to decision log {self.path} "
                    f"but may not be durable: {exc}"
                ) from exc

    def log_end(self, gtrid: str) -> None:
        """Append END(gtrid), lazily: durable with the next forced write or flush."""
        end = fmt.End(gtrid)
        data = fmt.encode(end)
        with self._mutex, self._crash_guard:
            self._check_usable()
            self._append(data, may_tear=False)
            fmt.apply(self._pending, end)
            self._maybe_compact()

    def flush(self) -> None:
        """Make everything appended so far durable."""
        with self._mutex, self._crash_guard:
            self._check_usable()
            self._wait_durable(self._written_lsn)

    def pending(self) -> dict[str, tuple[str, ...]]:
        """COMMIT records without END, as read on open plus what was logged since."""
        with self._cond:
            self._check_usable()
            return dict(self._pending)

    @property
    def forced_writes(self) -> int:
        """How many fsyncs of the log file since it was opened (compactions included)."""
        return self._forced_writes

    def close(self) -> None:
        """Flush lazy records (unless the log already failed) and release the lock; idempotent."""
        with self._cond:
            try:
                if self._unusable is None:
                    self._wait_durable(self._written_lsn)
            finally:
                self._mark_unusable(DecisionLogError, f"decision log {self.path} is closed")
                self._release()

    def abandon(self) -> None:
        """Drop the files as a process that dies would: no flush, the lock released.

        What was written stays in the file; what was not fsync'd may be lost
        only if the machine fails too. For crash tests; idempotent.
        """
        with self._cond:
            self._abandon("was abandoned")

    def __enter__(self) -> FileDecisionLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- durability --------------------------------------------------------------

    def _force(self, fd: int) -> None:
        """Make what was written to ``fd`` durable: the one place the log calls fsync."""
        self._forced_writes += 1
        try:
            self._fsync(fd)
        except OSError as exc:
            message = (
                f"fsync of decision log {self.path} failed ({exc}); the coordinator must stop "
                "(a retried fsync can report success for lost data) and be restarted, "
                "which reopens and checks the log and resolves what is in doubt"
            )
            self._mark_unusable(FsyncFailed, message)
            raise FsyncFailed(message) from exc

    def _sync_directory(self) -> None:
        """Make a rename or creation in the log's directory durable (fatal if it fails)."""
        self._sync_dir(os.path.dirname(os.path.abspath(self.path)))

    def _sync_dir(self, directory: str) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)  # a directory needs fsync proper, whatever self._fsync is
            finally:
                os.close(fd)
        except OSError as exc:
            message = f"fsync of directory {directory} failed ({exc}); the coordinator must stop"
            self._mark_unusable(FsyncFailed, message)
            raise FsyncFailed(message) from exc

    def _wait_durable(self, lsn: int) -> None:
        """Return once the first ``lsn`` bytes appended are durable (lock held; group commit)."""
        while self._durable_lsn < lsn:
            self._check_usable()  # a failed leader fails its followers too
            if self._flushing:
                self._cond.wait()
                continue
            assert self._fd is not None
            self._flushing = True
            target = self._written_lsn
            self._cond.release()  # let others append while we sync: they form the next group
            try:
                self._force(self._fd)
            finally:
                self._cond.acquire()
                self._flushing = False
                self._cond.notify_all()
            self._durable_lsn = max(self._durable_lsn, target)

    # -- appending ---------------------------------------------------------------

    def _append(self, data: bytes, *, may_tear: bool) -> int:
        """Write one record (lock held); return the LSN just past it."""
        assert self._fd is not None
        start = self._size
        try:
            if may_tear and failpoints.is_armed("log_torn_record"):
                half = len(data) // 2
                _write_all(self._fd, data[:half])
                failpoints.hit("log_torn_record")
                _write_all(self._fd, data[half:])
            else:
                written = os.write(self._fd, data)
                if written < len(data):  # the kernel wrote less: the rest follows
                    _write_all(self._fd, data[written:])
        except OSError as exc:
            self._undo_append(start, exc)
        self._size += len(data)
        self._written_lsn += len(data)
        return self._written_lsn

    def _undo_append(self, start: int, exc: OSError) -> None:
        """Cut a partly written record off, so the next append does not follow garbage."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, start)
        except OSError:
            message = (
                f"decision log {self.path}: an append failed ({_describe(exc)}) and the "
                "partial record could not be removed; restart the coordinator (reopening "
                "truncates it)"
            )
            self._mark_unusable(DecisionLogError, message)
            raise DecisionLogError(message) from exc
        raise DecisionLogError(
            f"cannot append to decision log {self.path} ({_describe(exc)}); the record was "
            "not written: free space on its file system (or fix that error)"
        ) from exc

    # -- opening and compaction ----------------------------------------------------

    def _make_parent_dirs(self) -> None:
        """Create missing parent directories, each durably linked into its parent."""
        directory = os.path.dirname(os.path.abspath(self.path))
        missing: list[str] = []
        while not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for created in reversed(missing):
            os.mkdir(created, DIRECTORY_MODE)
            self._sync_dir(os.path.dirname(created))

    def _open_or_create(self) -> tuple[int, int, dict[str, tuple[str, ...]]]:
        """(fd for appending, file size, pending set) of the log, created if missing."""
        replacement = self.path + REPLACEMENT_SUFFIX
        if _regular_or_missing(self.path, replacement, "its replacement"):
            os.unlink(replacement)  # an interrupted replacement; PATH is whole
        try:
            fd = _open_regular(self.path, self.path, "the log", os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return self._replace_with(fmt.HEADER), fmt.HEADER_SIZE, {}
        try:
            _tighten(fd)
            data = _read_all(fd)
            found = fmt.scan(data, self.path)
            if 0 < found.end < len(data):
                events.get_logger().warning(
                    "tpc.log.torn_tail_truncated",
                    path=self.path,
                    offset=found.end,
                    dropped_bytes=len(data) - found.end,
                )
                os.ftruncate(fd, found.end)
            # Recovery acts on what this reads, so it must be durable first: a process
            # that died leaves its unforced records in the page cache, and a power loss
            # after this restart would drop a COMMIT that recovery had already carried
            # out in one branch (docs/design.md §6, "Opening the log").
            self._force(fd)
        except BaseException:
            os.close(fd)
            raise
        if found.end == 0:  # empty, or a torn header: the log was never initialised
            os.close(fd)
            if data:
                events.get_logger().warning(events.LOG_TORN_HEADER_REINITIALISED, path=self.path)
            return self._replace_with(fmt.HEADER), fmt.HEADER_SIZE, {}
        return fd, found.end, fmt.replay(found.records)

    def _replace_with(self, content: bytes) -> int:
        """Atomically make ``content`` the whole log; return an fd for appending to it.

        Written and synced under another name, then renamed: a crash at any
        point leaves either the old file or the new one, each complete.
        """
        replacement = self.path + REPLACEMENT_SUFFIX
        # O_EXCL: a new file of our own, never whatever took that name meanwhile
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
        fd = os.open(replacement, flags, FILE_MODE)
        try:
            _write_all(fd, content)
            self._force(fd)
            os.rename(replacement, self.path)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, Exception):  # an injected crash leaves its debris, as a real one
                with contextlib.suppress(OSError):
                    os.unlink(replacement)
            raise
        try:
            # Past the rename the new file is the log: a failure here is fatal
            # (FsyncFailed), never "keep appending to the old one".
            self._sync_directory()
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _maybe_compact(self) -> None:
        """Compact once the file is past the threshold and has doubled since the last time.

        The doubling keeps compaction rare even when the pending set itself
        is larger than the threshold. Lock held; runs in the caller's thread.
        """
        while self._size > self._compact_at:
            if self._flushing:  # the leader's fsync uses the fd compaction replaces
                self._cond.wait()
            else:
                self._check_usable()
                self._compact()

    def _compact(self) -> None:
        """Replace the log by a header and one CHECKPOINT of the pending set (lock held)."""
        checkpoint = fmt.Checkpoint(tuple(fmt.Commit(g, p) for g, p in self._pending.items()))
        content = fmt.HEADER + fmt.encode(checkpoint)
        try:
            new_fd = self._replace_with(content)
        except OSError as exc:  # e.g. disk full: keep appending to the old file, retry later
            self._compact_at = 2 * self._size
            events.get_logger().warning(
                events.LOG_COMPACTION_FAILED, path=self.path, error=str(exc)
            )
            return
        assert self._fd is not None
        os.close(self._fd)
        events.get_logger().info(
            "tpc.log.compacted", path=self.path, before=self._size, after=len(content)
        )
        self._fd, self._size = new_fd, len(content)
        self._compact_at = max(self._threshold, 2 * self._size)
        self._durable_lsn = self._written_lsn  # the synced new file holds everything appended
        self._cond.notify_all()

    # -- states ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._unusable is not None:
            error, message = self._unusable
            raise error(message)

    def _mark_unusable(self, error: type[DecisionLogError], message: str) -> None:
        if self._unusable is None:  # the first cause is the one to report
            self._unusable = (error, message)

    def _abandon(self, why: str) -> None:
        """Unusable from now on; the files closed without a flush (lock held)."""
        self._mark_unusable(DecisionLogError, f"decision log {self.path} {why}; open it again")
        self._release()
        self._cond.notify_all()

    def _release(self) -> None:
        """Close the log and the lock file (closing the lock file releases the flock)."""
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None


def _take_lock(path: str) -> int:
    """Lock ``path`` for this process (non-blocking) and record our pid; return the lock fd."""
    lock_path = path + LOCK_SUFFIX
    fd = _open_regular(path, lock_path, "its lock file", os.O_RDWR | os.O_CREAT)
    try:
        _tighten(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise DecisionLogLocked(
            f"decision log {path} is locked by process {holder or '(pid not yet recorded)'} "
            f"(lock file {lock_path}): another coordinator is running on this log, or is "
            "stopped but still alive (e.g. SIGSTOP'd). Stop that process first; a process "
            "that dies releases the lock by itself."
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open_regular(log_path: str, path: str, role: str, flags: int) -> int:
    """Open ``path`` only if it is a regular file (or, with O_CREAT, missing).

    Checked before anything touches it (lstat, so nothing is opened that is not
    a regular file) and again on the opened fd (O_NOFOLLOW, fstat), so that a
    name swapped in between is refused too. DecisionLogError otherwise.
    """
    _regular_or_missing(log_path, path, role)
    fd = os.open(path, flags | os.O_NOFOLLOW, FILE_MODE)
    try:
        _require_regular(log_path, path, role, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _regular_or_missing(log_path: str, path: str, role: str) -> bool:
    """True if ``path`` is a regular file, False if nothing is there; DecisionLogError
    for anything else (a symbolic link, a device, a FIFO, a directory...)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    _require_regular(log_path, path, role, mode)
    return True


_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular(log_path: str, path: str, role: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    raise DecisionLogError(
        f"cannot open decision log {log_path}: {role} {path} is {kind}, not a regular file. "
        "The log only uses regular files (it creates them itself), so it left that one "
        "untouched: point the log at a path of its own (TWOPC_HOME, or the path given to "
        "FileDecisionLog)"
    )


class _CrashGuard:
    """On an injected crash inside it, the log drops its files as a dead process would,
    lock included. One per log, made once: entering it costs no generator per record."""

    def __init__(self, log: FileDecisionLog) -> None:
        self._log = log

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(exc_type, CrashInjected):
            self._log._abandon("was abandoned by an injected crash")


def _tighten(fd: int) -> None:
    """Make a file created before with a wider mode (or another umask) owner-only."""
    if os.fstat(fd).st_mode & 0o777 & ~FILE_MODE:
        os.fchmod(fd, FILE_MODE)


def _describe(exc: OSError) -> str:
    """'ENOSPC: No space left on device' for an OSError with an errno, else its text."""
    if exc.errno is None:
        return str(exc)
    return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or os.strerror(exc.errno)}"


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of ``data`` is written (one call, unless the kernel writes less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while chunk := os.pread(fd, max(size - offset, 1 << 16), offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_pending(path: str | os.PathLike[str]) -> dict[str, tuple[str, ...]]:
    """COMMIT-without-END records of the log at ``path``, read without taking its lock.

    For tools that only look (``twopc indoubt``, checks after a crash): a torn
    tail is ignored as opening would truncate it; damage in the middle raises
    DecisionLogCorrupt; a missing file holds nothing.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return {}
    return fmt.replay(fmt.scan(data, os.fspath(path)).records)


def read_entries(path: str | os.PathLike[str]) -> list[fmt.Entry]:
    """Every record and damaged stretch of the log at ``path``, read without its lock."""
    with open(path, "rb") as file:
        data = file.read()
    return list(fmt.walk(data, os.fspath(path)))


def truncate_at(path: str | os.PathLike[str], offset: int) -> list[fmt.Entry]:
    """Cut the log at ``path`` at byte ``offset``; return the entries that were cut off.

    The documented repair of a log damaged in the middle, once an operator
    knows what the records after the damage decided. It takes the log's lock
    (DecisionLogLocked while a coordinator runs on it) and syncs the file.
    """
    name = os.fspath(path)
    lock_fd = _take_lock(name)
    try:
        entries = read_entries(name)
        size = os.path.getsize(name)
        if not fmt.HEADER_SIZE <= offset <= size:
            raise DecisionLogError(
                f"offset {offset} is outside the records of {name} "
                f"({fmt.HEADER_SIZE} to {size} bytes)"
            )
        starts = {entry.offset for entry in entries} | {size}
        if offset not in starts:
            raise DecisionLogError(
                f"offset {offset} of {name} is inside a record; 'twopc log dump' shows where "
                "each record starts"
            )
        fd = _open_regular(name, name, "the log", os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        return [entry for entry in entries if entry.offset >= offset]
    finally:
        os.close(lock_fd)
