"""The crash torture: kill, stop, cut and pause 2PC transfers on the real lab, recover, check.

One *schedule* runs a batch of transfers in a child process
(:mod:`scenarios.torture_child`: what ``twopc transfer`` runs, plus a line per
outcome) and injects one fault while it runs:

=================  ==========================================================
fault              what happens
=================  ==========================================================
failpoint          only the failpoints armed in the child (``name=kill@N``) act
coordinator-kill   SIGKILL of the child ``at`` seconds into the batch
pg-stop            PostgreSQL A or B stopped in immediate mode, restarted after ``duration``
broker-kill        ActiveMQ SIGKILLed, restarted after ``duration``
net-reset          every connection through the target's proxy reset (``variant`` times)
net-blackhole      the target's proxy holds all traffic for ``duration``; then
                   ``heal`` (held bytes flow), ``reset`` (they are dropped), or
                   ``kill`` (the child is killed inside the partition and
                   recovery is tried there before it heals)
net-refuse         the target unreachable: its connections reset, new ones refused
                   for ``duration``
net-delay          ``duration`` seconds of latency on every chunk, the whole batch
pause              SIGSTOP of the child; recovery meanwhile must be refused (the
                   log's lock is held by a live process); then SIGCONT
                   (``resume``) or SIGKILL (``kill``)
=================  ==========================================================

Any schedule may also arm failpoints in the child (``failpoints``) and in the
first recovery pass (``recovery_failpoints``). After the child is gone and
every fault healed, ``twopc recover --json`` runs until it reports everything
resolved (each pass counted and timed), and the :class:`Ledger` checks the
invariants on the real services.

:func:`matrix` is every failpoint a transfer or its recovery passes, as a
kill, plus each fault kind; :func:`random_schedules` draws combinations.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from coordinator.events import get_logger
from coordinator.failpoints import NAMES, failpoint_env
from coordinator.log.file import LOCK_SUFFIX
from scenarios import transfer as scenario
from scenarios.config import Settings
from scenarios.lab import Lab
from scenarios.proxy import FaultProxy
from scenarios.torture_ledger import Check, Ledger
from scenarios.wiring import open_coordinator

#: Failpoints a transfer passes through, in protocol order.
TRANSFER_FAILPOINTS = (
    "after_begin",
    "after_prepare",
    "before_broker_commit",
    "after_broker_commit",
    "after_decision",
    "after_commit_prepared",
    "before_end",
)
#: Hit once per XA branch (twice per transfer), not once per transfer.
PER_BRANCH = frozenset({"after_prepare", "after_commit_prepared"})
RECOVERY_FAILPOINTS = ("recovery_after_gather", "recovery_after_resolve_one")
#: With a broker branch the transfer never forces a log write (the marker is the
#: decision); recovery forces one when it decides from a marker alone.
LOG_FAILPOINTS = ("log_torn_record", "log_unsynced_record")
assert set(TRANSFER_FAILPOINTS + RECOVERY_FAILPOINTS + LOG_FAILPOINTS) == set(NAMES)

SERVICES = ("pg-a", "pg-b", "activemq")
MAX_RECOVERY_PASSES = 6
TWOPC = [sys.executable, "-m", "scenarios.cli"]
CHILD = [sys.executable, "-m", "scenarios.torture_child"]

# Event names.
SCHEDULE_STARTED = "torture.schedule.started"
SCHEDULE_FINISHED = "torture.schedule.finished"


class Fault(enum.Enum):
    """The fault a schedule injects while its batch runs."""

    FAILPOINT = "failpoint"
    COORDINATOR_KILL = "coordinator-kill"
    PG_STOP = "pg-stop"
    BROKER_KILL = "broker-kill"
    NET_RESET = "net-reset"
    NET_BLACKHOLE = "net-blackhole"
    NET_REFUSE = "net-refuse"
    NET_DELAY = "net-delay"
    PAUSE = "pause"

    @property
    def via_proxy(self) -> bool:
        return self in (Fault.NET_RESET, Fault.NET_BLACKHOLE, Fault.NET_REFUSE, Fault.NET_DELAY)

    @property
    def needs_lab(self) -> bool:
        return self in (Fault.PG_STOP, Fault.BROKER_KILL)


@dataclass(frozen=True)
class Schedule:
    """One run of a batch with its faults; see the module docstring for the fields' meaning."""

    name: str
    fault: Fault
    count: int = 60
    concurrency: int = 8
    seed: int = 0
    failpoints: str = ""
    recovery_failpoints: str = ""
    target: str = ""  # pg-a, pg-b, activemq, or "all" (net faults)
    after: int = 0  # the fault waits for this many outcomes (a warm pool, work in flight)
    at: float = 0.0  # ... then this many seconds
    duration: float = 0.0
    variant: str = ""

    def describe(self) -> str:
        parts = [self.fault.value]
        if self.target:
            parts.append(self.target)
        if self.variant:
            parts.append(self.variant)
        if self.fault not in (Fault.FAILPOINT, Fault.NET_DELAY):
            parts.append(f"after {self.after} outcomes + {self.at:.2f}s")
        if self.duration:
            parts.append(f"for {self.duration:.2f}s")
        if self.failpoints:
            parts.append(f"child {self.failpoints}")
        if self.recovery_failpoints:
            parts.append(f"recovery {self.recovery_failpoints}")
        parts.append(f"{self.count}x{self.concurrency}")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fault": self.fault.value}


def _hit(rng: random.Random, name: str, count: int) -> int:
    """A hit count that lands in the middle of the batch, with transfers in flight."""
    per = 2 if name in PER_BRANCH else 1
    return rng.randint(max(1, count * per // 4), max(1, count * per // 2))


def matrix(seed: int = 0, *, count: int = 60, concurrency: int = 8) -> list[Schedule]:
    """Every failpoint as a kill (mid-batch), then each fault kind once."""
    rng = random.Random(seed)
    common: dict[str, Any] = {"count": count, "concurrency": concurrency}
    out = [
        Schedule(
            f"kill@{name}",
            Fault.FAILPOINT,
            seed=rng.randrange(1 << 30),
            failpoints=f"{name}=kill@{_hit(rng, name, count)}",
            **common,
        )
        for name in TRANSFER_FAILPOINTS
    ]
    # Inside recovery: leave a mix in doubt (decided and undecided), then kill the first pass.
    out += [
        Schedule(
            "kill@recovery_after_gather",
            Fault.FAILPOINT,
            seed=rng.randrange(1 << 30),
            failpoints=f"after_decision=kill@{_hit(rng, 'after_decision', count)}",
            recovery_failpoints="recovery_after_gather=kill",
            **common,
        ),
        Schedule(
            "kill@recovery_after_resolve_one",
            Fault.FAILPOINT,
            seed=rng.randrange(1 << 30),
            failpoints=f"after_prepare=kill@{_hit(rng, 'after_prepare', count)}",
            recovery_failpoints="recovery_after_resolve_one=kill@2",
            **common,
        ),
    ]
    # The forced log write: the child dies between the broker's COMMIT and its lazy
    # log record, so recovery decides from the marker and forces COMMIT -- and dies in it.
    out += [
        Schedule(
            f"kill@{name}",
            Fault.FAILPOINT,
            seed=rng.randrange(1 << 30),
            failpoints=f"after_broker_commit=kill@{_hit(rng, 'after_broker_commit', count)}",
            recovery_failpoints=f"{name}=kill",
            **common,
        )
        for name in LOG_FAILPOINTS
    ]
    # A running coordinator forces a log write too: when it decides its own in-doubt
    # transactions from their markers. A broker partition longer than the receipt
    # timeout (5 s) makes COMMITs in doubt; once healed, the child decides -- and dies.
    out += [
        Schedule(
            f"kill@{name} (in the transfer)",
            Fault.NET_BLACKHOLE,
            count=max(count, 150),
            concurrency=concurrency,
            seed=rng.randrange(1 << 30),
            failpoints=f"{name}=kill",
            target="activemq",
            after=concurrency * 2,
            at=round(rng.uniform(0.0, 0.2), 3),
            duration=6.0,
            variant="heal",
        )
        for name in LOG_FAILPOINTS
    ]
    timed_count = max(count, 150)  # enough transfers that a fault lands mid-batch

    def timed(
        name: str, fault: Fault, target: str = "", *, for_: float = 0.0, variant: str = ""
    ) -> Schedule:
        return Schedule(
            name,
            fault,
            count=timed_count,
            concurrency=concurrency,
            seed=rng.randrange(1 << 30),
            target=target,
            after=rng.randint(0, timed_count // 3),
            at=round(rng.uniform(0.0, 0.3), 3),
            duration=for_,
            variant=variant,
        )

    out += [
        timed("coordinator-kill", Fault.COORDINATOR_KILL),
        timed("pg-stop a", Fault.PG_STOP, "pg-a", for_=1.0),
        timed("pg-stop b", Fault.PG_STOP, "pg-b", for_=1.0),
        timed("broker-kill", Fault.BROKER_KILL, "activemq", for_=0.5),
        timed("net-reset all", Fault.NET_RESET, "all", for_=0.2, variant="3"),
        timed("net-blackhole broker", Fault.NET_BLACKHOLE, "activemq", for_=2.0, variant="heal"),
        timed("net-blackhole pg-a, reset", Fault.NET_BLACKHOLE, "pg-a", for_=1.0, variant="reset"),
        timed(
            "net-blackhole broker, kill", Fault.NET_BLACKHOLE, "activemq", for_=1.0, variant="kill"
        ),
        timed("net-refuse pg-b", Fault.NET_REFUSE, "pg-b", for_=1.0),
        Schedule("net-delay all", Fault.NET_DELAY, target="all", duration=0.01, **common),
        timed("pause, resume", Fault.PAUSE, variant="resume"),
        timed("pause, kill", Fault.PAUSE, variant="kill"),
    ]
    return out


def random_schedule(rng: random.Random, index: int, *, lab: bool = True) -> Schedule:
    """One random combination of a fault, child failpoints and recovery failpoints."""
    kinds = [f for f in Fault if lab or not f.needs_lab]
    fault = rng.choice(kinds)
    count = rng.choice((40, 80, 150))
    concurrency = rng.choice((1, 4, 8, 8, 16))
    failpoints = recovery_failpoints = target = variant = ""
    after = rng.randint(0, count // 2)
    at = round(rng.uniform(0.0, 0.3), 3)
    duration = 0.0
    if fault is Fault.FAILPOINT or rng.random() < 0.3:
        name = rng.choice(TRANSFER_FAILPOINTS + LOG_FAILPOINTS)
        failpoints = f"{name}=kill@{rng.randint(1, count * (2 if name in PER_BRANCH else 1))}"
    if rng.random() < 0.25:
        name = rng.choice(RECOVERY_FAILPOINTS + LOG_FAILPOINTS)
        recovery_failpoints = f"{name}=kill@{rng.randint(1, 3)}"
    if fault is Fault.PG_STOP:
        target, duration = rng.choice(("pg-a", "pg-b")), round(rng.uniform(0.2, 2.0), 2)
    elif fault is Fault.BROKER_KILL:
        target, duration = "activemq", round(rng.uniform(0.0, 1.5), 2)
    elif fault is Fault.NET_RESET:
        target, variant = rng.choice((*SERVICES, "all")), str(rng.randint(1, 3))
        duration = round(rng.uniform(0.05, 0.5), 2)
    elif fault is Fault.NET_BLACKHOLE:
        target = rng.choice((*SERVICES, "all"))
        variant = rng.choice(("heal", "reset", "kill"))
        duration = round(rng.uniform(0.2, 3.0), 2)
    elif fault is Fault.NET_REFUSE:
        target, duration = rng.choice((*SERVICES, "all")), round(rng.uniform(0.2, 2.0), 2)
    elif fault is Fault.NET_DELAY:
        target, duration = rng.choice((*SERVICES, "all")), rng.choice((0.001, 0.005, 0.02))
    elif fault is Fault.PAUSE:
        variant = rng.choice(("resume", "kill"))
    return Schedule(
        f"random-{index}",
        fault,
        count=count,
        concurrency=concurrency,
        seed=rng.randrange(1 << 30),
        failpoints=failpoints,
        recovery_failpoints=recovery_failpoints,
        target=target,
        after=after,
        at=at,
        duration=duration,
        variant=variant,
    )


def random_schedules(n: int, seed: int = 0, *, lab: bool = True) -> list[Schedule]:
    """``n`` random schedules, reproducible from ``seed``."""
    rng = random.Random(f"random-schedules-{seed}")
    return [random_schedule(rng, i + 1, lab=lab) for i in range(n)]


# -- results -------------------------------------------------------------------------


@dataclass
class RecoveryPass:
    """One ``twopc recover`` process."""

    exit_code: int
    seconds: float  # wall clock, process start included
    report: dict[str, Any] | None  # its --json output, when it got that far
    error: str = ""

    @property
    def killed(self) -> bool:
        return self.exit_code == -signal.SIGKILL

    @property
    def resolved(self) -> bool:
        return self.exit_code == 0 and bool(self.report and self.report.get("resolved"))


@dataclass
class RecoveryRun:
    """The passes it took until everything was resolved."""

    passes: list[RecoveryPass] = field(default_factory=list)
    decisions: dict[str, str] = field(default_factory=dict)  # gtrid -> commit / rollback
    seconds: float = 0.0  # wall clock, from the first pass to the resolved one

    @property
    def resolved(self) -> bool:
        return bool(self.passes) and self.passes[-1].resolved

    @property
    def failpoint_fired(self) -> bool:
        return bool(self.passes) and self.passes[0].killed

    @property
    def in_process_seconds(self) -> float:
        """The recoveries' own figure: gather, fence, decide, act (no process start-up)."""
        return sum(float(p.report.get("seconds", 0.0)) for p in self.passes if p.report)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passes": len(self.passes),
            "resolved": self.resolved,
            "seconds": round(self.seconds, 3),
            "in_process_seconds": round(self.in_process_seconds, 3),
            "killed_passes": sum(p.killed for p in self.passes),
            "decisions": dict(Counter(self.decisions.values())),
            "errors": [p.error for p in self.passes if p.error],
        }


@dataclass
class ScheduleResult:
    """What one schedule did and what the check found."""

    schedule: Schedule
    exit_code: int | None
    killed_by_torture: bool
    hung: bool
    outcomes: Counter[str]
    errors: list[str]  # exceptions that reached a caller instead of an outcome
    recovery: RecoveryRun
    check: Check
    notes: dict[str, Any]
    seconds: float

    @property
    def failpoint_fired(self) -> bool:
        """The child died by SIGKILL that the torture did not send: an armed failpoint."""
        return self.exit_code == -signal.SIGKILL and not self.killed_by_torture

    @property
    def problems(self) -> list[str]:
        found = list(self.check.problems())
        if not self.recovery.resolved:
            last = self.recovery.passes[-1].error if self.recovery.passes else ""
            found.append(
                f"recovery did not resolve everything in {len(self.recovery.passes)} passes"
                + (f": {last}" if last else "")
            )
        if self.hung:
            found.append("the batch did not finish in time after every fault had healed")
        if self.notes.get("paused_recovery") == "ran":
            found.append("recovery ran while the coordinator was paused (its log lock is held)")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.as_dict(),
            "describe": self.schedule.describe(),
            "exit_code": self.exit_code,
            "failpoint_fired": self.failpoint_fired,
            "hung": self.hung,
            "outcomes": dict(self.outcomes),
            "errors": self.errors[:5],
            "recovery": self.recovery.as_dict(),
            "check": self.check.as_dict(),
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "problems": self.problems,
            "ok": self.ok,
        }


# -- the runner -------------------------------------------------------------------------


class Torture:
    """Runs schedules against the lab; one instance owns the proxies and the ledger."""

    def __init__(
        self,
        settings: Settings,
        *,
        lab: Lab | None = None,
        accounts: int = 1000,
        balance: int = 1_000_000,
        child_deadline: float = 90.0,
        fence_timeout: float = 30.0,
        workdir: Path | None = None,
        reset: bool = True,
    ) -> None:
        self.settings = settings
        self.reset = reset
        self.lab = lab
        self.accounts = accounts
        self.balance = balance
        self.child_deadline = child_deadline
        self.fence_timeout = fence_timeout
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="twopc-torture-"))
        self.proxies: dict[str, FaultProxy] = {}
        self.ledger = Ledger(settings)
        self._log = get_logger(component="torture")

    # -- set-up ------------------------------------------------------------------

    def start(self) -> Torture:
        """Proxies up; recover what an earlier run left; reset the tables and the queue."""
        if self.proxies:
            return self
        pg_a = psycopg.conninfo.conninfo_to_dict(self.settings.pg_a)
        pg_b = psycopg.conninfo.conninfo_to_dict(self.settings.pg_b)
        upstreams = {
            "pg-a": f"{pg_a.get('host', '127.0.0.1')}:{pg_a.get('port', 5432)}",
            "pg-b": f"{pg_b.get('host', '127.0.0.1')}:{pg_b.get('port', 5432)}",
            "activemq": self.settings.stomp,
        }
        for name, upstream in upstreams.items():
            self.proxies[name] = FaultProxy(upstream, name=name).start()
        open_coordinator(self.settings, sessions=2).close()  # recovery: prepared rows hold locks
        if self.reset:
            scenario.reset(self.settings, accounts=self.accounts, balance=self.balance)
        else:
            self.ledger.drain()  # what is queued now was delivered before this run
        return self

    def close(self) -> None:
        """Heal everything, bring stopped services back, stop the proxies."""
        self._heal_all()
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()
        if self._own_workdir:
            for path in self.workdir.glob("*"):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.workdir.rmdir()

    def __enter__(self) -> Torture:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def service_faults(self) -> bool:
        """Whether PostgreSQL and the broker can be stopped and started (the lab is ours)."""
        return self.lab is not None

    # -- one schedule ----------------------------------------------------------------

    def run(self, schedule: Schedule) -> ScheduleResult:
        """Run ``schedule``: batch with faults, recovery until resolved, invariants."""
        if schedule.fault.needs_lab and self.lab is None:
            raise ValueError(
                f"schedule {schedule.name} stops services, which needs the embedded lab "
                "('twopc lab up' with TWOPC_HOME pointing at it)"
            )
        started = time.monotonic()
        self._log.info(SCHEDULE_STARTED, schedule=schedule.name, describe=schedule.describe())
        outcomes_path = self.workdir / f"{schedule.name.replace(' ', '_')}.jsonl"
        outcomes_path.unlink(missing_ok=True)
        stderr_path = outcomes_path.with_suffix(".stderr")
        notes: dict[str, Any] = {}
        if schedule.fault is Fault.NET_DELAY:
            for proxy in self._targets(schedule):
                proxy.delay(schedule.duration)
        killed = hung = False
        with open(stderr_path, "wb") as stderr:
            child = subprocess.Popen(
                [
                    *CHILD,
                    "--count",
                    str(schedule.count),
                    "--concurrency",
                    str(schedule.concurrency),
                    "--accounts",
                    str(self.accounts),
                    "--seed",
                    str(schedule.seed),
                    "--outcomes",
                    str(outcomes_path),
                ],
                env=self._child_env(schedule),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            if self._wait_outcomes(child, outcomes_path, 0):
                killed = self._inject(schedule, child, outcomes_path, notes)
            try:
                child.wait(timeout=self.child_deadline)
            except subprocess.TimeoutExpired:
                hung = True
        finally:
            if child.poll() is None:
                killed = True
                child.kill()
                child.wait(timeout=30)
            notes["batch_seconds"] = round(time.monotonic() - started, 3)
            self._heal_all()
        outcomes, errors, reported = _read_outcomes(outcomes_path)
        if child.returncode not in (0, -signal.SIGKILL):
            notes["child_stderr"] = _tail(stderr_path)
        recovery = self.recover(schedule.recovery_failpoints)
        check = self.ledger.check(reported)
        result = ScheduleResult(
            schedule=schedule,
            exit_code=child.returncode,
            killed_by_torture=killed,
            hung=hung,
            outcomes=outcomes,
            errors=errors,
            recovery=recovery,
            check=check,
            notes=notes,
            seconds=time.monotonic() - started,
        )
        self._log.info(
            SCHEDULE_FINISHED,
            schedule=schedule.name,
            ok=result.ok,
            problems=result.problems,
            seconds=round(result.seconds, 2),
        )
        return result

    def _child_env(self, schedule: Schedule, *, failpoints: str | None = None) -> dict[str, str]:
        env = {**os.environ, **self.settings.as_env()}
        armed = schedule.failpoints if failpoints is None else failpoints
        env.update(failpoint_env(armed))
        if schedule.fault.via_proxy:
            a, b = self.proxies["pg-a"], self.proxies["pg-b"]
            env["TWOPC_PG_A"] = psycopg.conninfo.make_conninfo(
                self.settings.pg_a, host="127.0.0.1", port=a.port
            )
            env["TWOPC_PG_B"] = psycopg.conninfo.make_conninfo(
                self.settings.pg_b, host="127.0.0.1", port=b.port
            )
            env["TWOPC_STOMP"] = self.proxies["activemq"].address
        return env

    @staticmethod
    def _wait_outcomes(child: subprocess.Popen[bytes], path: Path, outcomes: int) -> bool:
        """Wait until the child is ready and told ``outcomes`` callers; False if it ended first."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                if path.read_bytes().count(b"\n") > outcomes:  # the first line is "ready"
                    return True
            if child.poll() is not None:
                return False
            time.sleep(0.005)
        return False

    def _targets(self, schedule: Schedule) -> list[FaultProxy]:
        if schedule.target == "all":
            return list(self.proxies.values())
        return [self.proxies[schedule.target]]

    def _inject(
        self,
        s: Schedule,
        child: subprocess.Popen[bytes],
        outcomes_path: Path,
        notes: dict[str, Any],
    ) -> bool:
        """Inject ``s``'s fault; return True if the torture killed the child itself."""
        if s.fault in (Fault.FAILPOINT, Fault.NET_DELAY):
            return False
        self._wait_outcomes(child, outcomes_path, s.after)
        time.sleep(s.at)
        notes["alive_at_fault"] = child.poll() is None
        if s.fault is Fault.COORDINATOR_KILL:
            return _kill(child)
        if s.fault is Fault.PG_STOP:
            assert self.lab is not None
            self.lab.stop_service(s.target, immediate=True)
            time.sleep(s.duration)
            self.lab.start_service(s.target)
            return False
        if s.fault is Fault.BROKER_KILL:
            assert self.lab is not None
            self.lab.kill("activemq")
            time.sleep(s.duration)
            self.lab.start_service("activemq")
            return False
        if s.fault is Fault.NET_RESET:
            resets = 0
            for i in range(int(s.variant or 1)):
                if i:
                    time.sleep(s.duration)
                resets += sum(p.reset() for p in self._targets(s))
            notes["connections_reset"] = resets
            return False
        if s.fault is Fault.NET_REFUSE:
            for proxy in self._targets(s):
                proxy.refuse()
            notes["connections_reset"] = sum(p.reset() for p in self._targets(s))
            time.sleep(s.duration)
            for proxy in self._targets(s):
                proxy.heal()
            return False
        if s.fault is Fault.NET_BLACKHOLE:
            for proxy in self._targets(s):
                proxy.blackhole()
            time.sleep(s.duration)
            killed = False
            if s.variant == "kill":
                killed = _kill(child)
                # Recovery inside the partition: it must not guess. The dead process's
                # broker sessions are held open by the partition, so fencing fails.
                attempt = self._recover_pass("", fence_timeout=2.0)
                notes["partition_recovery"] = "resolved" if attempt.resolved else "refused"
            for proxy in self._targets(s):
                proxy.heal(reset=s.variant == "reset")
            return killed
        if s.fault is Fault.PAUSE:
            if child.poll() is not None:
                notes["paused_recovery"] = "child already finished"
                return False
            child.send_signal(signal.SIGSTOP)
            killed = False
            try:
                if self._log_lock_free():
                    # Stopped after it closed its log (the batch had just ended): the
                    # lock is rightly free, so this pause proves nothing either way.
                    notes["paused_recovery"] = "child had closed its log"
                else:
                    attempt = self._recover_pass("", fence_timeout=2.0)
                    ran = attempt.exit_code in (0, 1)
                    notes["paused_recovery"] = "ran" if ran else "refused"
                    notes["paused_recovery_error"] = attempt.error
            finally:
                if s.variant == "kill":
                    killed = _kill(child)  # SIGKILL ends a stopped process too
                else:
                    child.send_signal(signal.SIGCONT)
            return killed
        raise AssertionError(f"unknown fault {s.fault}")  # pragma: no cover

    def _log_lock_free(self) -> bool:
        """Whether nobody holds the decision log's lock (taken and released at once)."""
        fd = os.open(f"{self.settings.log_path}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing drops the lock if we got it
        return True

    def _heal_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()
            proxy.delay(0)
        if self.lab is not None:
            for status in self.lab.status():
                if status.state != "up":
                    self.lab.start_service(status.name)

    # -- recovery ----------------------------------------------------------------------

    def recover(self, failpoints: str = "") -> RecoveryRun:
        """``twopc recover`` until resolved (``failpoints`` armed in the first pass only)."""
        run = RecoveryRun()
        started = time.monotonic()
        while len(run.passes) < MAX_RECOVERY_PASSES:
            attempt = self._recover_pass(failpoints if not run.passes else "", self.fence_timeout)
            run.passes.append(attempt)
            for item in (attempt.report or {}).get("transactions", []):
                if item.get("error") is None:
                    run.decisions[item["gtrid"]] = item["decision"]
            if attempt.resolved:
                break
            if not attempt.killed:
                time.sleep(0.5)  # e.g. a service still starting
        run.seconds = time.monotonic() - started
        return run

    def _recover_pass(self, failpoints: str, fence_timeout: float) -> RecoveryPass:
        env = {**os.environ, **self.settings.as_env()}
        env.update(failpoint_env(failpoints))
        started = time.monotonic()
        done = subprocess.run(
            [*TWOPC, "recover", "--json", "--fence-timeout", str(fence_timeout)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=fence_timeout + 120,
        )
        seconds = time.monotonic() - started
        report = None
        if done.returncode in (0, 1):
            with contextlib.suppress(ValueError):
                report = json.loads(done.stdout)
        error = ""
        if done.returncode not in (0, -signal.SIGKILL):
            lines = (done.stderr or done.stdout).strip().splitlines()
            error = lines[-1][:300] if lines else f"exit status {done.returncode}"
        return RecoveryPass(done.returncode, seconds, report, error)


def _kill(child: subprocess.Popen[bytes]) -> bool:
    """SIGKILL ``child`` if it still runs; True if it did."""
    if child.poll() is not None:
        return False
    child.kill()
    child.wait()
    return True


def _read_outcomes(path: Path) -> tuple[Counter[str], list[str], dict[str, str]]:
    """Outcome counts, unexpected errors and id -> outcome from a child's outcome file."""
    counts: Counter[str] = Counter()
    errors: list[str] = []
    reported: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError), open(path) as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if "outcome" not in record:
                continue
            counts[record["outcome"]] += 1
            reported[record["id"]] = record["outcome"]
            if record["outcome"] == "error":
                errors.append(record.get("error", ""))
    return counts, errors, reported


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def lab_for(settings: Settings) -> Lab | None:
    """The embedded lab behind ``settings``, if the settings point at it and it runs."""
    lab = Lab(settings.home)
    env = lab.settings_env()
    if (env["TWOPC_PG_A"], env["TWOPC_PG_B"], env["TWOPC_STOMP"]) != (
        settings.pg_a,
        settings.pg_b,
        settings.stomp,
    ):
        return None
    if any(status.state != "up" for status in lab.status()):
        return None
    return lab
