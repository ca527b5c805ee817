"""The crash torture's schedules: the faults, one schedule's fields, the matrix and random draws.

One *schedule* runs a batch of transfers in a child process
(:mod:`scenarios.torture.child`: what ``twopc transfer`` runs, plus a line per
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
first recovery pass (``recovery_failpoints``).

A schedule with ``coordinators`` 2 or 3 runs that many children at once, each
a coordinator with its own id in postgres mode (TWOPC_DECISIONS=postgres, no
local state); the fault and the failpoints hit the first one only, the others
go on (and may recover it: they look for dead peers every few seconds), and
recovery is ``twopc recover --dead`` from a coordinator id of its own. While
the first child is paused, that recovery must leave it alone (its liveness
lock is held). :func:`peer_schedules` are these.

:func:`matrix` is every failpoint a transfer or its recovery passes, as a
kill, plus each fault kind; :func:`random_schedules` draws combinations.
"""

from __future__ import annotations

import enum
import random
from dataclasses import asdict, dataclass
from typing import Any

from coordinator.failpoints import NAMES

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
#: Only a database-only transaction whose decision is a row (TWOPC_DECISIONS=postgres)
#: passes these; a transfer always has its broker branch.
DECISION_ROW_FAILPOINTS = ("before_decision_row_commit", "after_decision_row_commit")
assert set(
    TRANSFER_FAILPOINTS + RECOVERY_FAILPOINTS + LOG_FAILPOINTS + DECISION_ROW_FAILPOINTS
) == set(NAMES)

SERVICES = ("pg-a", "pg-b", "activemq")


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
    coordinators: int = 1  # > 1: that many children in postgres mode; the fault hits the first

    def describe(self) -> str:
        parts = [self.fault.value]
        if self.coordinators > 1:
            parts.insert(0, f"{self.coordinators} coordinators (postgres),")
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


#: Transfers in a schedule whose fault lands at a time: after up to a third of them were
#: told, then up to 0.3 s. The rest must outlast that: at the 700-800 transfers/s the
#: coordinator reaches here at concurrency 8, 400 transfers take 0.5 s or more. With 150,
#: a pause landed after the batch had closed its log (0.244 s after 16 outcomes), and the
#: pause proved nothing.
TIMED_COUNT = 600


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
    # The partition must find transfers in flight: with 150, one that began 0.14-0.18 s
    # after the 16th outcome found 147-149 of them told already, and in one run the
    # failpoint did not fire (see TIMED_COUNT).
    out += [
        Schedule(
            f"kill@{name} (in the transfer)",
            Fault.NET_BLACKHOLE,
            count=max(count, TIMED_COUNT),
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
    timed_count = max(count, TIMED_COUNT)

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


def peer_schedules(seed: int = 0, *, count: int = 60, concurrency: int = 8) -> list[Schedule]:
    """Two or three coordinators in postgres mode; the first is killed or paused mid-batch."""
    rng = random.Random(seed ^ 0x5EE2)
    timed_count = max(count, TIMED_COUNT)

    def kill_at(name: str, coordinators: int) -> Schedule:
        return Schedule(
            f"peers x{coordinators} kill@{name}",
            Fault.FAILPOINT,
            count=count,
            concurrency=concurrency,
            seed=rng.randrange(1 << 30),
            failpoints=f"{name}=kill@{_hit(rng, name, count)}",
            coordinators=coordinators,
        )

    def timed(name: str, fault: Fault, coordinators: int, variant: str = "") -> Schedule:
        return Schedule(
            name,
            fault,
            count=timed_count,
            concurrency=concurrency,
            seed=rng.randrange(1 << 30),
            after=rng.randint(0, timed_count // 3),
            at=round(rng.uniform(0.0, 0.3), 3),
            variant=variant,
            coordinators=coordinators,
        )

    return [
        kill_at("after_prepare", 3),
        kill_at("after_broker_commit", 2),
        kill_at("after_decision", 3),
        kill_at("after_commit_prepared", 2),
        Schedule(
            "peers x3 kill@recovery_after_resolve_one",
            Fault.FAILPOINT,
            count=count,
            concurrency=concurrency,
            seed=rng.randrange(1 << 30),
            failpoints=f"after_decision=kill@{_hit(rng, 'after_decision', count)}",
            recovery_failpoints="recovery_after_resolve_one=kill",
            coordinators=3,
        ),
        timed("peers x3 coordinator-kill", Fault.COORDINATOR_KILL, 3),
        timed("peers x2 pause, resume", Fault.PAUSE, 2, "resume"),
        timed("peers x3 pause, kill", Fault.PAUSE, 3, "kill"),
    ]
