"""A decision log that cannot be written: every transaction still ends in an outcome,
nothing the coordinator can finish stays prepared, a failed start releases the log,
and the file log only ever opens regular files."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest

from coordinator.aio import AsyncCoordinator
from coordinator.coordinator import Coordinator
from coordinator.errors import (
    ConfigurationError,
    DecisionLogError,
    FsyncFailed,
    ParticipantUnavailable,
    RecordNotDurable,
    TransactionAborted,
    TransactionInDoubt,
)
from coordinator.log import DecisionLog
from coordinator.log.file import LOCK_SUFFIX, REPLACEMENT_SUFFIX, FileDecisionLog, read_pending
from coordinator.log.memory import MemoryDecisionLog
from coordinator.states import Outcome, TxState
from coordinator.xid import gtrid_prefix
from participants.aio.fake import AsyncFakeBroker, AsyncFakeResource
from participants.aio.postgres import AsyncPostgresResource
from participants.fake import FakeBroker, FakeResource, FakeStore
from participants.postgres import PostgresResource
from scenarios.config import Settings
from scenarios.transfer import model as scenario
from scenarios.transfer.invariants import gather_evidence
from scenarios.wiring import open_coordinator
from tests.conftest import free_port

TWOPC = [sys.executable, "-m", "scenarios.cli"]

FULL = "cannot append to decision log /fake/decisions.log (ENOSPC: No space left on device)"


class FailingLog(MemoryDecisionLog):
    """The in-memory log whose COMMIT or END appends fail on demand, as on a full disk."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()  # "commit", "end"

    def log_commit(self, gtrid: str, participants: Sequence[str], *, force: bool) -> None:
        if "commit" in self.failing:
            raise DecisionLogError(f"{FULL}; the record was not written")
        super().log_commit(gtrid, participants, force=force)

    def log_end(self, gtrid: str) -> None:
        if "end" in self.failing:
            raise DecisionLogError(f"{FULL}; the record was not written")
        super().log_end(gtrid)


class Disk:
    """An fsync stand-in that fails with EIO once ``broken``."""

    def __init__(self) -> None:
        self.broken = False

    def fsync(self, fd: int) -> None:
        if self.broken:
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)


class Api(Protocol):
    """One coordinator, sync or asyncio, over fake databases a and b (and broker mq)."""

    a: FakeStore
    b: FakeStore
    mq: FakeStore

    def transfer(self) -> Any: ...

    def begin(self) -> object: ...

    def retry_deferred(self) -> int: ...

    def close(self) -> None: ...


class SyncApi:
    def __init__(self, log: DecisionLog, stores: tuple[FakeStore, ...], broker: bool) -> None:
        self.a, self.b, self.mq = stores
        self.coordinator = Coordinator(
            "t1",
            log,
            [FakeResource("a", self.a), FakeResource("b", self.b)],
            FakeBroker("mq", self.mq) if broker else None,
            housekeeping_interval=None,
        )

    def transfer(self) -> Any:
        tx = self.coordinator.begin()
        try:
            with tx:
                tx.execute("a", "debit")
                tx.execute("b", "credit")
                if self.coordinator.broker is not None:
                    tx.send("/queue/transfers", "{}")
        except (TransactionAborted, TransactionInDoubt):
            pass
        return tx

    def begin(self) -> object:
        return self.coordinator.begin()

    def retry_deferred(self) -> int:
        return self.coordinator.retry_deferred()

    def close(self) -> None:
        self.coordinator.close()


class AsyncApi:
    def __init__(self, log: DecisionLog, stores: tuple[FakeStore, ...], broker: bool) -> None:
        self.a, self.b, self.mq = stores
        self.runner = asyncio.Runner()
        self.coordinator = AsyncCoordinator(
            "t1",
            log,
            [
                AsyncFakeResource(FakeResource("a", self.a)),
                AsyncFakeResource(FakeResource("b", self.b)),
            ],
            AsyncFakeBroker(FakeBroker("mq", self.mq)) if broker else None,
            housekeeping_interval=None,
        )
        try:
            self.runner.run(self.coordinator.start())
        except BaseException:
            self.runner.close()
            raise

    def transfer(self) -> Any:
        async def work() -> Any:
            tx = self.coordinator.begin()
            try:
                async with tx:
                    await tx.execute("a", "debit")
                    await tx.execute("b", "credit")
                    if self.coordinator.broker is not None:
                        await tx.send("/queue/transfers", "{}")
            except (TransactionAborted, TransactionInDoubt):
                pass
            return tx

        return self.runner.run(work())

    def begin(self) -> object:
        return self.coordinator.begin()

    def retry_deferred(self) -> int:
        return self.runner.run(self.coordinator.retry_deferred())

    def close(self) -> None:
        try:
            self.runner.run(self.coordinator.close())
        finally:
            self.runner.close()


Factory = Callable[..., Api]


@pytest.fixture(params=["sync", "asyncio"])
def api(request: pytest.FixtureRequest) -> Factory:
    """Makes a sync or an asyncio coordinator (same fakes, same log)."""
    kind = SyncApi if request.param == "sync" else AsyncApi

    def make(log: DecisionLog, *, broker: bool, stores: tuple[FakeStore, ...] | None = None) -> Api:
        return kind(log, stores or (FakeStore(), FakeStore(), FakeStore()), broker)

    return make


def records_of(log: MemoryDecisionLog, gtrid: str) -> list[str]:
    return [type(r).__name__ for r in log.records if getattr(r, "gtrid", None) == gtrid]


# -- before the commit point: the forced record -----------------------------------------


def test_forced_record_not_written_aborts_and_rolls_every_branch_back(api: Factory) -> None:
    """Without a broker, a COMMIT record that could not be appended aborts: every prepared
    branch is rolled back and the reason names the log and the errno."""
    log = FailingLog()
    world = api(log, broker=False)
    log.failing.add("commit")
    tx = world.transfer()
    assert tx.outcome is Outcome.ABORTED and tx.state is TxState.ABORTED
    assert "/fake/decisions.log" in tx.reason and "ENOSPC" in tx.reason
    assert tx.log_failure is not None
    assert world.a.prepared == {} and world.b.prepared == {}
    assert world.a.committed == {} and world.b.committed == {}
    log.failing.clear()  # the disk has room again: the next transaction commits
    assert world.transfer().outcome is Outcome.COMMITTED
    world.close()


def test_forced_record_not_durable_is_in_doubt_until_the_reopened_log_decides(
    api: Factory, tmp_path: Path
) -> None:
    """A COMMIT record written whose fsync failed: IN_DOUBT, begin() then refuses saying to
    restart, close() releases the lock, and recovery follows what the reopened file holds."""
    path = tmp_path / "decisions.log"
    disk = Disk()
    stores = (FakeStore(), FakeStore(), FakeStore())
    world = api(FileDecisionLog(path, fsync=disk.fsync), broker=False, stores=stores)
    disk.broken = True
    tx = world.transfer()
    assert tx.outcome is Outcome.IN_DOUBT
    assert isinstance(tx.log_failure, RecordNotDurable)
    assert "may not be durable" in tx.reason
    with pytest.raises(FsyncFailed, match=r"must stop .* be restarted"):
        world.begin()
    world.close()  # does not raise, releases the lock
    assert read_pending(path) == {tx.gtrid: ("a", "b")}  # in the file: the reopen commits
    restarted = api(FileDecisionLog(path), broker=False, stores=stores)  # recovery at start
    try:
        assert stores[0].prepared == {} and stores[1].prepared == {}
        assert tx.gtrid in stores[0].committed and tx.gtrid in stores[1].committed
    finally:
        restarted.close()


def test_transaction_reaching_a_log_that_already_failed_aborts(tmp_path: Path) -> None:
    """A transaction begun before the log's fsync failed finds the log refusing before its
    record is appended: nothing was decided, so it aborts and rolls everything back."""
    disk = Disk()
    a, b = FakeStore(), FakeStore()
    coordinator = Coordinator(
        "t1",
        FileDecisionLog(tmp_path / "decisions.log", fsync=disk.fsync),
        [FakeResource("a", a), FakeResource("b", b)],
        housekeeping_interval=None,
    )
    late = coordinator.begin()
    late.execute("a", "debit")
    late.execute("b", "credit")
    disk.broken = True
    with pytest.raises(TransactionInDoubt), coordinator.transaction() as first:
        first.execute("a", "debit")
        first.execute("b", "credit")
    assert late.commit() is Outcome.ABORTED
    assert "fsync of decision log" in late.reason and isinstance(late.log_failure, FsyncFailed)
    prepared = {xid.gtrid for xid in (*a.prepared, *b.prepared)}
    assert prepared == {first.gtrid}  # only the one whose record may be durable
    coordinator.close()


# -- after the commit point: the lazy COMMIT record and END --------------------------------


def test_failed_lazy_commit_record_after_the_marker_commits_everywhere(api: Factory) -> None:
    """With a broker the marker decides: a COMMIT record that cannot be written changes
    nothing (COMMITTED, phase 2 done); the backlog writes COMMIT, and END only after it."""
    log = FailingLog()
    world = api(log, broker=True)
    log.failing.update({"commit"})
    tx = world.transfer()
    assert tx.outcome is Outcome.COMMITTED and tx.log_failure is not None
    assert world.a.committed[tx.gtrid] == ["debit"] and world.b.committed[tx.gtrid] == ["credit"]
    assert world.a.prepared == {} and world.b.prepared == {}
    assert tx.gtrid in world.mq.markers
    assert world.retry_deferred() == 0  # COMMIT still fails: no END without it
    assert records_of(log, tx.gtrid) == []
    log.failing.clear()
    assert world.retry_deferred() == 1
    assert records_of(log, tx.gtrid) == ["Commit", "End"]
    assert log.pending() == {}
    world.close()
    assert world.mq.markers == set()  # swept once END is durable


def test_failed_end_record_is_written_later_by_the_backlog(api: Factory) -> None:
    """A failed END leaves the transaction COMMITTED; the backlog appends END later."""
    log = FailingLog()
    world = api(log, broker=False)
    log.failing.add("end")
    tx = world.transfer()
    assert tx.outcome is Outcome.COMMITTED and tx.log_failure is not None
    assert tx.gtrid in world.a.committed and tx.gtrid in world.b.committed
    assert log.pending() == {tx.gtrid: ("a", "b")}
    log.failing.clear()
    assert world.retry_deferred() == 1
    assert records_of(log, tx.gtrid) == ["Commit", "End"] and log.pending() == {}
    world.close()


def test_close_releases_everything_when_the_log_failed(api: Factory, tmp_path: Path) -> None:
    """close() on a coordinator whose log's fsync failed does not raise and frees the lock."""
    path = tmp_path / "decisions.log"
    disk = Disk()
    world = api(FileDecisionLog(path, fsync=disk.fsync), broker=True)
    assert world.transfer().outcome is Outcome.COMMITTED
    disk.broken = True
    world.close()
    FileDecisionLog(path).close()  # the lock is free


# -- a start that fails ------------------------------------------------------------------


def test_failed_start_releases_the_log_so_that_a_retry_starts(
    api: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start whose recovery fails (a database down) closes the log and its lock: a
    retry in the same process starts."""
    path = tmp_path / "decisions.log"
    down = FakeStore()
    recover = FakeResource.recover

    def unreachable(self: FakeResource, format_id: int, prefix: str) -> dict[Any, Any]:
        if self.store is down:
            raise ParticipantUnavailable("connection refused", participant=self.name)
        return recover(self, format_id, prefix)

    monkeypatch.setattr(FakeResource, "recover", unreachable)
    with pytest.raises(ParticipantUnavailable, match="connection refused"):
        api(FileDecisionLog(path), broker=True, stores=(down, FakeStore(), FakeStore()))
    world = api(FileDecisionLog(path), broker=True)
    assert world.transfer().outcome is Outcome.COMMITTED
    world.close()


def test_refused_configuration_releases_the_log(tmp_path: Path) -> None:
    """A coordinator refused at construction (two participants named alike) closes its log."""
    path = tmp_path / "decisions.log"
    twins = [FakeResource("a", FakeStore()), FakeResource("a", FakeStore())]
    with pytest.raises(ConfigurationError, match="two participants"):
        Coordinator("t1", FileDecisionLog(path), twins)
    with pytest.raises(ConfigurationError, match="two participants"):
        AsyncCoordinator("t1", FileDecisionLog(path), [AsyncFakeResource(r) for r in twins])
    FileDecisionLog(path).close()  # the lock is free


# -- a log that is only ever a regular file ---------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o644)


def _device(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of this test's own


def _symlink(path: Path) -> None:
    target = path.with_name("target")
    target.write_bytes(b"")
    target.chmod(0o644)
    path.symlink_to(target)


def _directory(path: Path) -> None:
    path.mkdir(mode=0o755)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (_device, "a character device"),
        (_fifo, "a FIFO"),
        (_symlink, "a symbolic link"),
        (_directory, "a directory"),
    ],
)
@pytest.mark.parametrize("suffix", ["", LOCK_SUFFIX, REPLACEMENT_SUFFIX])
def test_log_refuses_anything_but_a_regular_file_and_leaves_it_untouched(
    tmp_path: Path, make: Callable[[Path], None], kind: str, suffix: str
) -> None:
    """A log, lock or replacement path that is a device, FIFO, symlink or directory is
    refused with its path and kind before anything changes it (mode, name, target)."""
    log_path = tmp_path / "decisions.log"
    odd = Path(f"{log_path}{suffix}")
    make(odd)
    before = os.lstat(odd)
    target = tmp_path / "target"
    with pytest.raises(DecisionLogError, match=f"{odd} is {kind}, not a regular file"):
        FileDecisionLog(log_path)
    after = os.lstat(odd)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (
        before.st_mode,
        before.st_ino,
        before.st_rdev,
    )
    if target.exists():
        assert target.read_bytes() == b"" and stat.S_IMODE(target.stat().st_mode) == 0o644


# -- a real full disk ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave: int) -> Path:
    """Fill ``mount`` until about ``leave`` bytes are free; return the filler file."""
    filler = mount / "filler"
    usage = os.statvfs(mount)
    free = usage.f_bavail * usage.f_frsize
    filler.write_bytes(b"x" * max(0, free - leave))
    return filler


def test_full_disk_aborts_at_the_forced_record_naming_the_log_and_errno(
    small_disk: Path,
) -> None:
    """On a real full file system, no broker: the first COMMIT record that does not fit
    aborts its transaction (log path and ENOSPC in the reason), nothing stays prepared,
    and once space is freed the same coordinator commits again."""
    path = small_disk / "home" / "decisions.log"
    stores = (FakeStore(), FakeStore(), FakeStore())
    world = SyncApi(FileDecisionLog(path), stores, broker=False)
    filler = fill(small_disk, leave=8 * 1024)
    for _ in range(2000):
        tx = world.transfer()
        if tx.outcome is not Outcome.COMMITTED:
            break
    assert tx.outcome is Outcome.ABORTED, tx.reason
    assert str(path) in tx.reason and "ENOSPC" in tx.reason
    assert stores[0].prepared == {} and stores[1].prepared == {}
    assert tx.gtrid not in stores[0].committed and tx.gtrid not in stores[1].committed
    filler.unlink()
    assert world.transfer().outcome is Outcome.COMMITTED
    world.close()
    assert read_pending(path) == {}


# -- on the lab ---------------------------------------------------------------------------


def _prepared(settings: Settings) -> list[str]:
    """The gtrids of this coordinator's prepared branches in A and B."""
    found = []
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
        found += [gid for (gid,) in rows if gtrid_prefix(settings.coordinator_id) in gid]
    return found


@pytest.mark.lab
def test_transfer_on_a_full_disk_stops_with_one_line_and_a_summary(
    settings: Settings, small_disk: Path
) -> None:
    """'twopc transfer --count 500' with its state folder on a full 64 KiB tmpfs exits 1
    with its summary and one 'twopc: error:' line naming the log; nothing of it stays
    prepared; once space is freed, recovery runs and every invariant holds."""
    open_coordinator(settings).close()
    scenario.reset(settings, accounts=100, balance=10_000)
    home = small_disk / "home"
    home.mkdir()
    filler = fill(small_disk, leave=16 * 1024)
    env = {**os.environ, "TWOPC_HOME": str(home)}
    done = subprocess.run(
        [*TWOPC, "transfer", "--count", "500"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert _prepared(settings) == []
    assert re.search(r"2pc: \d+ committed, \d+ aborted, \d+ in doubt", done.stdout), done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("twopc: error:")]
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(errors) == 1 and str(home / "decisions.log") in errors[0], errors
    assert "ENOSPC" in errors[0] and "Traceback" not in done.stderr
    filler.unlink()
    recovered = subprocess.run(
        [*TWOPC, "recover"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    evidence = gather_evidence(settings)
    assert evidence.ok, evidence.as_dict()


@pytest.mark.lab
def test_start_with_a_database_down_releases_everything_then_a_retry_starts(
    settings: Settings, tmp_path: Path
) -> None:
    """A coordinator (sync, then asyncio) whose start fails on an unreachable database
    releases the log's lock: a retry in the same process on the same log starts."""
    path = tmp_path / "decisions.log"
    nobody = f"host=127.0.0.1 port={free_port()} user=twopc dbname=twopc connect_timeout=2"
    with pytest.raises(ParticipantUnavailable):
        Coordinator("t1", FileDecisionLog(path), [PostgresResource("a", nobody)])
    Coordinator("t1", FileDecisionLog(path), [PostgresResource("a", settings.pg_a)]).close()

    async def asyncio_twin() -> None:
        down = AsyncCoordinator("t1", FileDecisionLog(path), [AsyncPostgresResource("a", nobody)])
        with pytest.raises(ParticipantUnavailable):
            await down.start()
        retry = [AsyncPostgresResource("a", settings.pg_a)]
        async with AsyncCoordinator("t1", FileDecisionLog(path), retry) as coordinator:
            assert coordinator.active == []

    asyncio.run(asyncio_twin())
