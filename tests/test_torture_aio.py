"""The crash torture of the asyncio coordinator on the real lab (``twopc torture --api asyncio``).

The child the torture kills runs ``AsyncCoordinator``: it is killed at every
failpoint of the transfer and by a coordinator kill, a broker kill,
connections reset and a pause then a kill; after ``twopc recover`` the
invariants are checked on PostgreSQL and ActiveMQ themselves. Two or three of
them in postgres mode, the first killed or paused, are recovered by their
peers and ``twopc recover --dead``. A module of its
own: its runner resets the tables and keeps its own ledger, so it must not
run while tests/test_torture.py's runner holds one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from scenarios.config import Settings
from scenarios.lab.services import Lab
from scenarios.torture.runner import Torture, peer_id
from scenarios.torture.schedules import (
    TRANSFER_FAILPOINTS,
    Fault,
    Schedule,
    matrix,
    peer_schedules,
)
from scenarios.transfer.invariants import prepared_of

pytestmark = pytest.mark.lab

#: What the asyncio coordinator is crashed with: every failpoint of the transfer as a kill,
#: the coordinator killed mid-batch, and the broker killed, its connections reset, the
#: coordinator paused then killed, under it.
AIO_FAULTS = {Fault.COORDINATOR_KILL, Fault.BROKER_KILL, Fault.NET_RESET, Fault.PAUSE}
AIO_MATRIX = [
    s
    for s in matrix(seed=5)
    if (s.fault is Fault.FAILPOINT and not s.recovery_failpoints and "log_" not in s.failpoints)
    or (s.fault in AIO_FAULTS and s.variant != "resume")
]
PEER_SCHEDULES = {s.name: s for s in peer_schedules(seed=5)}


@pytest.fixture(scope="module")
def torture_aio(lab: Lab, settings: Settings) -> Iterator[Torture]:
    """A torture runner whose children run the asyncio coordinator."""
    with Torture(settings, lab=lab, api="asyncio") as runner:
        yield runner


def test_the_asyncio_matrix_kills_at_every_failpoint_of_the_transfer() -> None:
    """The asyncio coordinator is killed at each of the transfer's failpoints, and by each
    of the chosen faults."""
    armed = " ".join(s.failpoints for s in AIO_MATRIX)
    for name in TRANSFER_FAILPOINTS:
        assert f"{name}=kill" in armed, name
    assert {s.fault for s in AIO_MATRIX} > AIO_FAULTS


@pytest.mark.slow
@pytest.mark.parametrize("schedule", AIO_MATRIX, ids=[s.name for s in AIO_MATRIX])
def test_the_asyncio_coordinator_keeps_every_invariant_when_killed(
    torture_aio: Torture, schedule: Schedule
) -> None:
    """The child's AsyncCoordinator killed or its services failed, then 'twopc recover':
    atomic, conserved, nothing prepared, no marker left, as on threads."""
    result = torture_aio.run(schedule)
    assert result.ok, result.problems
    assert result.recovery.resolved
    assert result.outcomes["committed"] > 0, result.outcomes
    if schedule.fault is Fault.FAILPOINT:
        assert result.failpoint_fired, f"{schedule.failpoints} did not fire"
    else:
        assert result.notes["alive_at_fault"], "the fault came after the batch had finished"
    if schedule.fault is Fault.PAUSE:
        assert result.notes["paused_recovery"] == "refused"


@pytest.mark.parametrize(
    "name", ["peers x3 coordinator-kill", "peers x2 pause, resume", "peers x3 kill@after_decision"]
)
def test_several_asyncio_coordinators_keep_every_invariant_when_the_first_dies(
    torture_aio: Torture, name: str
) -> None:
    """Two or three asyncio coordinators in postgres mode, the first SIGKILLed (at a kill
    or a failpoint) or paused: recovered by their peers and 'twopc recover --dead'."""
    schedule = PEER_SCHEDULES[name]
    result = torture_aio.run(schedule)
    assert result.ok, result.problems
    assert result.outcomes["committed"] > 0, result.outcomes
    assert result.notes["survivors_exit"] == [0] * (schedule.coordinators - 1)
    for index in range(schedule.coordinators):
        assert prepared_of(replace(torture_aio.settings, coordinator_id=peer_id(index))) == []
    if schedule.fault is Fault.FAILPOINT:
        assert result.failpoint_fired, f"{schedule.failpoints} did not fire"
