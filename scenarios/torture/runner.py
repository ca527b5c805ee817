"""The crash torture's runner: one schedule's batch, its fault, recovery until resolved, the check.

:class:`Torture` runs a :class:`~scenarios.torture.schedules.Schedule`: the batch
in a child process (:mod:`scenarios.torture.child`, its coordinator on threads or,
with ``api="asyncio"``, on asyncio), the schedule's fault
injected while it runs (the lab's services stopped or killed, the traffic
through a :class:`~scenarios.lab.proxy.FaultProxy` cut, the child paused or
killed). After the child is gone and every fault healed, ``twopc recover
--json`` runs until it reports everything resolved (each pass counted and
timed), and the :class:`~scenarios.torture.ledger.Ledger` checks the
invariants on the real services. A schedule with several coordinators runs
one child per coordinator (postgres mode, ids :func:`peer_id`) and recovers
with ``twopc recover --dead``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg

from coordinator.errors import TwoPhaseCommitError
from coordinator.events import get_logger
from coordinator.failpoints import failpoint_env
from coordinator.log.file import LOCK_SUFFIX
from scenarios import events as ev
from scenarios.config import APIS, Settings
from scenarios.lab import procfs
from scenarios.lab.proxy import FaultProxy
from scenarios.lab.services import Lab
from scenarios.torture.ledger import Ledger
from scenarios.torture.results import RecoveryPass, RecoveryRun, ScheduleResult
from scenarios.torture.schedules import Fault, Schedule
from scenarios.transfer import model as scenario
from scenarios.transfer.invariants import markers_of, prepared_of
from scenarios.wiring import open_coordinator

MAX_RECOVERY_PASSES = 6
TWOPC = [sys.executable, "-m", "scenarios.cli"]
CHILD = [sys.executable, "-m", "scenarios.torture.child"]
#: The coordinator id 'twopc recover --dead' runs as in several-coordinator schedules.
RECOVERER_ID = "torture-recoverer"


class TortureSetupFailed(TwoPhaseCommitError):
    """The torture could not start from a clean lab; the message says what to run."""


def peer_id(index: int) -> str:
    """The coordinator id of child ``index`` in a schedule with several coordinators."""
    return f"torture-peer{index}"


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
        api: str = "threads",
    ) -> None:
        if api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, not {api!r}")
        self.settings = settings
        self.api = api  # the children's coordinator: threads or asyncio
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
        if self._prepared_gids():  # a killed run's peers left theirs: recover the dead
            self.recover(dead=True)
        if self.reset:
            try:
                scenario.reset(self.settings, accounts=self.accounts, balance=self.balance)
            except psycopg.errors.LockNotAvailable as exc:
                raise self._locked_out() from exc
        else:
            self.ledger.drain()  # what is queued now was delivered before this run
        return self

    def _locked_out(self) -> TortureSetupFailed:
        """The reset waited too long for a lock: name what is still prepared in A and B."""
        left = self._prepared_gids()
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        return TortureSetupFailed(
            f"the reset of the tables timed out waiting for a lock; prepared in A or B: "
            f"{shown or 'nothing'}. Neither 'twopc recover' nor 'twopc recover --dead' "
            "(TWOPC_DECISIONS=postgres) resolved these; a transaction of no live or "
            "registered twopc coordinator is resolved by hand, with COMMIT PREPARED or "
            "ROLLBACK PREPARED '<gid>' in that database"
        )

    def _prepared_gids(self) -> list[str]:
        """'<db>: <gtrid> (gid <gid>)' of every transaction prepared in A or B, of any
        coordinator (a gid twopc did not write is its own gtrid)."""
        found = []
        for name, dsn in (("a", self.settings.pg_a), ("b", self.settings.pg_b)):
            with psycopg.connect(dsn) as conn:
                rows = conn.execute("SELECT gid FROM pg_prepared_xacts ORDER BY gid").fetchall()
            found += [f"{name}: {psycopg.Xid.from_string(g).gtrid} (gid {g})" for (g,) in rows]
        return found

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

    # -- one schedule ----------------------------------------------------------------

    def run(self, schedule: Schedule) -> ScheduleResult:
        """Run ``schedule``: batch with faults, recovery until resolved, invariants."""
        if schedule.fault.needs_lab and self.lab is None:
            raise ValueError(
                f"schedule {schedule.name} stops services, which needs the embedded lab "
                "('twopc lab up' with TWOPC_HOME pointing at it)"
            )
        started = time.monotonic()
        self._log.info(
            ev.SCHEDULE_STARTED, schedule=schedule.name, describe=schedule.describe(), api=self.api
        )
        outcomes_path = self.workdir / f"{schedule.name.replace(' ', '_')}.jsonl"
        outcomes_path.unlink(missing_ok=True)
        stderr_path = outcomes_path.with_suffix(".stderr")
        notes: dict[str, Any] = {}
        if schedule.fault is Fault.NET_DELAY:
            for proxy in self._targets(schedule):
                proxy.delay(schedule.duration)
        killed = hung = False
        peers = schedule.coordinators > 1
        paths = [outcomes_path] + [
            outcomes_path.with_suffix(f".{i}.jsonl") for i in range(1, schedule.coordinators)
        ]
        for path in paths[1:]:
            path.unlink(missing_ok=True)
        children: list[subprocess.Popen[bytes]] = []
        with open(stderr_path, "wb") as stderr:
            for index, path in enumerate(paths):
                children.append(
                    subprocess.Popen(
                        [
                            *CHILD,
                            "--count",
                            str(schedule.count),
                            "--concurrency",
                            str(schedule.concurrency),
                            "--accounts",
                            str(self.accounts),
                            "--seed",
                            str(schedule.seed + index),
                            "--outcomes",
                            str(path),
                            "--api",
                            self.api,
                        ],
                        env=self._child_env(
                            schedule,
                            failpoints=None if index == 0 else "",
                            coordinator=index if peers else None,
                        ),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                    )
                )
        child = children[0]  # the one the fault hits
        try:
            if self._wait_outcomes(child, outcomes_path, 0):
                killed = self._inject(schedule, child, outcomes_path, notes)
            deadline = time.monotonic() + self.child_deadline
            for each in children:
                try:
                    each.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    hung = True
        finally:
            for index, each in enumerate(children):
                if each.poll() is None:
                    killed = killed or index == 0
                    each.kill()
                    each.wait(timeout=30)
            notes["batch_seconds"] = round(time.monotonic() - started, 3)
            self._heal_all()
        outcomes: Counter[str] = Counter()
        errors: list[str] = []
        reported: dict[str, str] = {}
        for path in paths:
            counts, errs, told = _read_outcomes(path)
            outcomes.update(counts)
            errors += errs
            reported.update(told)
        if peers:
            notes["survivors_exit"] = [each.returncode for each in children[1:]]
        if child.returncode not in (0, -signal.SIGKILL):
            notes["child_stderr"] = _tail(stderr_path)
        recovery = self.recover(schedule.recovery_failpoints, dead=peers)
        check = self.ledger.check(reported)
        if peers:  # the ledger looks at the main coordinator's gtrids; these are the children's
            for index in range(schedule.coordinators):
                theirs = replace(self.settings, coordinator_id=peer_id(index))
                check.prepared_left += prepared_of(theirs)
                check.markers_left += len(markers_of(theirs))
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
            ev.SCHEDULE_FINISHED,
            schedule=schedule.name,
            ok=result.ok,
            problems=result.problems,
            seconds=round(result.seconds, 2),
        )
        return result

    def _child_env(
        self, schedule: Schedule, *, failpoints: str | None = None, coordinator: int | None = None
    ) -> dict[str, str]:
        settings = self.settings
        if coordinator is not None:
            settings = replace(settings, coordinator_id=peer_id(coordinator), decisions="postgres")
        env = {**os.environ, **settings.as_env()}
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
            stopped = _wait_stopped(child.pid)  # the signal is asynchronous: see it land
            killed = False
            try:
                if not stopped:
                    # It died first (an armed failpoint's own SIGKILL): no pause to test.
                    notes["paused_recovery"] = "child died before it stopped"
                elif s.coordinators > 1:
                    # Its liveness lock is held: no peer may fence or recover it now.
                    attempt = self._recover_pass("", fence_timeout=2.0, dead=True)
                    taken = {p["peer"] for p in (attempt.report or {}).get("peers", [])}
                    notes["paused_recovery"] = "ran" if peer_id(0) in taken else "refused"
                    notes["paused_recovery_error"] = attempt.error
                elif self._log_lock_free():
                    # Stopped after it closed its log (the batch had just ended): the
                    # lock is rightly free, so this pause proves nothing either way.
                    notes["paused_recovery"] = "child had closed its log"
                else:
                    attempt = self._recover_pass("", fence_timeout=2.0)
                    ran = attempt.report is not None  # a refused recovery prints no report
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

    def recover(self, failpoints: str = "", *, dead: bool = False) -> RecoveryRun:
        """``twopc recover`` (``--dead``: of the dead peers) until resolved (``failpoints``
        armed in the first pass only)."""
        run = RecoveryRun()
        started = time.monotonic()
        while len(run.passes) < MAX_RECOVERY_PASSES:
            attempt = self._recover_pass(
                failpoints if not run.passes else "", self.fence_timeout, dead=dead
            )
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

    def _recover_pass(
        self, failpoints: str, fence_timeout: float, *, dead: bool = False
    ) -> RecoveryPass:
        settings = self.settings
        if dead:
            settings = replace(settings, coordinator_id=RECOVERER_ID, decisions="postgres")
        env = {**os.environ, **settings.as_env()}
        env.update(failpoint_env(failpoints))
        started = time.monotonic()
        done = subprocess.run(
            [
                *TWOPC,
                "recover",
                "--json",
                "--fence-timeout",
                str(fence_timeout),
                *(["--dead"] if dead else []),
            ],
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
            if dead and report is not None:
                report = _dead_report(report)
        error = ""
        if done.returncode not in (0, -signal.SIGKILL):
            lines = (done.stderr or done.stdout).strip().splitlines()
            error = lines[-1][:300] if lines else f"exit status {done.returncode}"
        return RecoveryPass(done.returncode, seconds, report, error)


def _dead_report(output: dict[str, Any]) -> dict[str, Any]:
    """``twopc recover --dead --json`` as one recovery report: every peer's transactions."""
    peers = output.get("peers", [])
    recoveries = [p.get("recovery") or {} for p in peers]
    return {
        "peers": peers,
        "resolved": all(p.get("resolved") for p in peers),
        "seconds": sum(float(p.get("seconds", 0.0)) for p in peers),
        "transactions": [t for r in recoveries for t in r.get("transactions", [])],
    }


def _wait_stopped(pid: int, timeout: float = 2.0) -> bool:
    """Wait until ``pid`` is stopped (state T in /proc); False if it ended or never stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = procfs.stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        if fields[0] in ("T", "t"):
            return True
        time.sleep(0.005)
    return False


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
