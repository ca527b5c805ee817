"""The throughput ratios at concurrency 16 and the CPU per transfer at 8, measured side by side.

The coordinator, the plain sequential 2PC (``floor-seq``), the outbox-status
strategy, ``outbox-status+event`` and ``coordinator-db`` run in turn, a block of
each per round, the order rotated every round, so that a machine that slows down
or speeds up between minutes (a shared one does, by up to half) weighs on all of
them alike. Each ratio is the ratio of the medians of the rounds' throughputs;
every round's ratio is kept beside it to show the spread.

Each round then runs the coordinator and ``floor-seq`` at concurrency 8, one
block each in alternating order, and takes the CPU each process spent per
committed transfer in each block (this process: the Python CPU). The figure
is each contender's median over the rounds, so the coordinator's CPU is
compared with the hand-written 2PC's measured in the same minutes.

The outbox-status strategy runs with its relay and consumer in their own
processes, as deployed. After each block of an outbox the run waits until the
consumer has applied every transfer the block committed, so that the relay's
and the consumer's catch-up does not land in the next contender's block.

outbox-status sends one message, the credit command, to one queue. The
coordinator credits B itself and publishes the ``transfer.completed`` event,
which the broker copies into every consumer queue of the events' virtual topic
(four in the lab). ``outbox-status+event`` (:class:`OutboxWithEvent`) writes
that event too, so that the event reaches the same consumers under both: the
like-for-like comparison. ``coordinator-db`` is the other one: the coordinator
over A and B with no broker branch (:func:`~scenarios.bench.contenders.db_only_coordinator`),
which, like outbox-status, debits A and credits B and publishes nothing, B's credit
inside the global transaction instead of behind a relay and a consumer. The target
stays the ratio of the coordinator to outbox-status as the strategy runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from coordinator.errors import TwoPhaseCommitError
from coordinator.states import Outcome
from outbox.message import OutboxMessage
from scenarios.bench import contenders, measure
from scenarios.bench.contenders import Contender, TransferSource
from scenarios.bench.server_costs import service_cpu
from scenarios.config import Settings
from scenarios.strategies.outbox import OutboxStatusStrategy
from scenarios.transfer.model import (
    EVENT_TOPIC,
    TRANSFER_COMPLETED,
    TYPE_HEADER,
    Transfer,
    drain_events,
)

if TYPE_CHECKING:
    from scenarios.outbox.pipeline import Pipeline

OUTBOX = "outbox-status"
OUTBOX_EVENT = "outbox-status+event"
COORDINATOR = "coordinator"
COORDINATOR_DB = "coordinator-db"
FLOOR_SEQ = "floor-seq"
#: The contenders, in the first round's order.
NAMES = (COORDINATOR, FLOOR_SEQ, OUTBOX, OUTBOX_EVENT, COORDINATOR_DB)
#: The ratios summarised beside the coordinator's to every other contender: the
#: coordinator without its broker branch against the outbox that sends no event either.
BESIDE = ((COORDINATOR_DB, OUTBOX),)
#: The contenders whose relay and consumer finish a block's transfers after it.
OUTBOXES = (OUTBOX, OUTBOX_EVENT)
CONCURRENCY = 16
#: Where the CPU per transfer is measured, and of which contenders (first round's order).
CPU_CONCURRENCY = 8
CPU_NAMES = (COORDINATOR, FLOOR_SEQ)
#: How long the run waits for the outbox's consumer to apply a block's transfers.
CONVERGE_TIMEOUT = 120.0


class NotConverged(TwoPhaseCommitError):
    """The outbox's consumer did not apply a block's transfers in time."""


class OutboxWithEvent(OutboxStatusStrategy):
    """outbox-status that also writes the coordinator's ``transfer.completed`` event for the
    events' virtual topic: a second outbox row, written with the credit command in one
    round trip, which the status relay publishes beside it. The outbox's key names one
    message, so the event's is the transfer id followed by ``/transfer.completed``."""

    def messages(self, transfer: Transfer) -> list[OutboxMessage]:
        event = OutboxMessage(
            f"{transfer.transfer_id}/{TRANSFER_COMPLETED}",
            EVENT_TOPIC,
            transfer.body(),
            {TYPE_HEADER: TRANSFER_COMPLETED},
        )
        return [*super().messages(transfer), event]


def summarise(rounds: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Each contender's median throughput over ``rounds``, the coordinator's ratio to each
    other contender, and the pairs of :data:`BESIDE` that were measured: the ratio of the
    medians, with every round's own ratio."""
    names = list(rounds[0])
    pairs = [(COORDINATOR, other) for other in names if other != COORDINATOR]
    pairs += [(ours, other) for ours, other in BESIDE if ours in names and other in names]
    return {
        "throughput_per_s": {
            name: round(statistics.median(r[name] for r in rounds), 1) for name in names
        },
        "ratios": {
            f"{ours}/{other}": {
                "median": measure.ratio_of_medians(rounds, ours, other),
                "rounds": [measure.ratio(r[ours], r[other]) for r in rounds],
            }
            for ours, other in pairs
        },
    }


def summarise_cpu(rounds: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """Each contender's median CPU ms per committed transfer over ``rounds``, by process
    (a block that committed nothing has no figures, and is left out)."""
    out: dict[str, dict[str, float]] = {}
    for name in rounds[0]:
        by_process: dict[str, list[float]] = {}
        for r in rounds:
            for process, ms in r[name].items():
                by_process.setdefault(process, []).append(ms)
        out[name] = {p: round(statistics.median(v), 3) for p, v in by_process.items()}
    return out


def run(settings: Settings, *, rounds: int, seconds: float) -> dict[str, Any]:
    """``rounds`` rounds of a ``seconds`` block of each contender at concurrency 16, and of
    the coordinator and ``floor-seq`` at 8; the throughputs and each process's CPU per
    transfer at 16 under ``throughput_c16``, the CPU per transfer at 8 under ``cpu_c8``."""
    from scenarios.outbox import pipeline

    # Subscribing creates the event topic's queues: every contender that publishes the
    # event pays for its copies into all of them, whoever ran before.
    drain_events(settings)
    source = TransferSource(seed=22)
    outboxes = {OUTBOX: OutboxStatusStrategy(), OUTBOX_EVENT: OutboxWithEvent()}
    for strategy in outboxes.values():
        strategy.prepare(settings, concurrency=CONCURRENCY)
    # One status relay publishes every pending row, whatever its destination.
    running = pipeline.for_strategy(settings, outboxes[OUTBOX], processes=True).start()
    opened: dict[str, Contender] = {}
    try:
        factories = contenders.contenders(settings)
        for name in (COORDINATOR, FLOOR_SEQ, COORDINATOR_DB):
            opened[name] = factories[name](CONCURRENCY)
        committed: list[str] = []

        def outbox_op(strategy: OutboxStatusStrategy) -> measure.Op:
            def op(_index: int) -> bool:
                transfer = source.next()
                outcome, _ = strategy.run_one(transfer)
                if outcome is Outcome.COMMITTED:
                    committed.append(transfer.transfer_id)
                    return True
                return False

            return op

        ops = {name: contenders.op_of(c, source) for name, c in opened.items()}
        ops.update({name: outbox_op(strategy) for name, strategy in outboxes.items()})

        def after(name: str) -> None:
            if name not in OUTBOXES:
                return
            missing = pipeline.wait_converged(
                settings, set(committed), timeout=CONVERGE_TIMEOUT, check=running.check
            )
            if missing:
                raise NotConverged(
                    f"the outbox's consumer applied {len(committed) - len(missing)} of the "
                    f"{len(committed)} transfers of a block within {CONVERGE_TIMEOUT:.0f} s; "
                    "the relay or the consumer is stuck: 'twopc doctor' checks the broker, "
                    "then run the benchmark again"
                )
            committed.clear()

        # Warm every connection, and the outbox's relay and consumer, before the clock.
        for name in NAMES:
            measure.closed_loop(name, ops[name], concurrency=CONCURRENCY, count=2 * CONCURRENCY)
            after(name)
        measured, costs_c16, costs = _rounds(
            ops, after, _with_outbox(service_cpu(settings), running), rounds=rounds, seconds=seconds
        )
    finally:
        running.stop()
        for strategy in outboxes.values():
            strategy.close()
        for contender in opened.values():
            contender.close()
        drain_events(settings)
    return {
        "throughput_c16": {
            "concurrency": CONCURRENCY,
            "seconds_per_block": seconds,
            "rounds": measured,
            **summarise(measured),
            "cpu_rounds": costs_c16,
            "cpu_ms_per_transfer": summarise_cpu(costs_c16),
        },
        "cpu_c8": {
            "concurrency": CPU_CONCURRENCY,
            "seconds_per_block": seconds,
            "rounds": costs,
            "cpu_ms_per_transfer": summarise_cpu(costs),
        },
    }


def _with_outbox(cpu: measure.ServiceCpu, running: Pipeline) -> measure.ServiceCpu:
    """``cpu``'s processes and the outbox's relay and consumer (one of each), each counted
    as its own process tree."""
    roots = dict(cpu.roots)
    for worker in running.workers:
        if worker.process is not None:
            roots[f"outbox {worker.kind}"] = worker.process.pid
    return measure.ServiceCpu(roots)


def _rounds(
    ops: Mapping[str, measure.Op],
    after: Callable[[str], None],
    cpu: measure.ServiceCpu,
    *,
    rounds: int,
    seconds: float,
) -> tuple[
    list[dict[str, float]], list[dict[str, dict[str, float]]], list[dict[str, dict[str, float]]]
]:
    """Each round's throughput of every contender at 16 and the CPU per transfer each
    process spent on its block (an outbox's until its consumer has caught up, so that the
    relay's and the consumer's work counts), then the CPU per transfer of each of
    :data:`CPU_NAMES` at 8 by process; the order rotated by one each round."""
    measured, costs_c16, costs = [], [], []
    for index in range(rounds):
        row, spent_c16 = {}, {}
        for name in _rotated(NAMES, index):
            before = cpu.snapshot()
            result = measure.closed_loop(name, ops[name], concurrency=CONCURRENCY, duration=seconds)
            row[name] = round(result.throughput, 1)
            after(name)
            spent_c16[name] = measure.ServiceCpu.per_op_ms(before, cpu.snapshot(), result.committed)
        measured.append({name: row[name] for name in NAMES})
        costs_c16.append({name: spent_c16[name] for name in NAMES})
        spent = {}
        for name in _rotated(CPU_NAMES, index):
            before = cpu.snapshot()
            result = measure.closed_loop(
                name, ops[name], concurrency=CPU_CONCURRENCY, duration=seconds
            )
            spent[name] = measure.ServiceCpu.per_op_ms(before, cpu.snapshot(), result.committed)
        costs.append({name: spent[name] for name in CPU_NAMES})
    return measured, costs_c16, costs


def _rotated(names: Sequence[str], index: int) -> Sequence[str]:
    """``names`` rotated left by ``index``."""
    shift = index % len(names)
    return [*names[shift:], *names[:shift]]
