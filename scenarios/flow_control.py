"""The push model's danger: with producer flow control on, a slow consumer holds up its
producers.

The lab's queues have ``producerFlowControl="false"`` (scenarios.lab.templates),
so a consumer that falls behind leaves a backlog in the broker's store and the
producers never notice. The queues under ``FLOW_LIMITED_PREFIX`` have it on, with
a memory limit of ``FLOW_LIMITED_MEMORY`` and every pending message held in
memory: once the messages sent but not yet acknowledged fill that memory, the
broker holds each further SEND's receipt until the consumer has made room, so a
producer that waits for its receipts (as a JMS producer of persistent messages
does) sends at the consumer's pace.

:func:`run_case` measures one producer sending ``messages`` persistent messages,
each awaiting its receipt, to a queue of its own with one consumer that takes
``delay`` seconds per message: the producer's send latency, its throughput, and
the backlog the consumer still had when the producer finished.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from participants.stomp_ops import Subscription
from scenarios.config import Settings
from scenarios.lab.templates import FLOW_LIMITED_MEMORY, FLOW_LIMITED_PREFIX
from scenarios.transfer import model as scenario
from scenarios.transfer.results import percentiles
from scenarios.wiring import open_stomp

#: The body of each message (a credit command's size).
BODY = "x" * 200


@dataclass(frozen=True)
class FlowCase:
    """One producer and one consumer: flow control on or off, the consumer fast or slow."""

    name: str
    flow_control: bool
    slow: bool


FAST_LIMITED = FlowCase("fast consumer, flow control on", flow_control=True, slow=False)
SLOW_LIMITED = FlowCase("slow consumer, flow control on", flow_control=True, slow=True)
SLOW_UNLIMITED = FlowCase("slow consumer, flow control off (lab default)", False, slow=True)

#: The cases of the report, in its order.
CASES = (FAST_LIMITED, SLOW_LIMITED, SLOW_UNLIMITED)


@dataclass
class FlowResult:
    """What the producer saw: its send latency and throughput; the consumer's backlog."""

    case: str
    flow_control: bool
    consumer_delay_ms: float
    messages: int
    seconds: float
    sends_per_s: float
    #: p50, p90, p99, p99.9, max of the producer's SEND-to-receipt time, ms.
    send_ms: dict[str, float] = field(default_factory=dict)
    #: Messages the consumer had not yet processed when the producer finished.
    backlog: int = 0
    memory_limit: str = FLOW_LIMITED_MEMORY

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Consumer:
    """One consumer on its own connection: ACKs each message, after ``delay`` while slow."""

    def __init__(self, subscription: Subscription, ack: Any, delay: float) -> None:
        self.subscription = subscription
        self.ack = ack
        self.delay = delay
        self.slow = delay > 0
        self.consumed = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                message = self.subscription.get(0.2)
                if message is None:
                    continue
                if self.slow:
                    time.sleep(self.delay)  # the consumer's work: a slow disk, a slow service
                self.ack(message)
                self.consumed += 1
        except BaseException as exc:  # reported by run_case
            self.error = exc


def queue_for(case: FlowCase) -> str:
    """A queue of this run's own: under the flow-limited prefix when flow control is on."""
    prefix = FLOW_LIMITED_PREFIX if case.flow_control else "flow.default."
    return f"/queue/{prefix}{scenario.new_run_id()}"


def run_case(
    settings: Settings,
    case: FlowCase,
    *,
    messages: int = 300,
    delay: float = 0.02,
    timeout: float = 120.0,
) -> FlowResult:
    """Send ``messages`` messages, each awaiting its receipt, to a queue with one consumer."""
    queue = queue_for(case)
    consumer_delay = delay if case.slow else 0.0
    latencies: list[float] = []
    with open_stomp(settings, participant="flow-consumer") as consuming:
        subscription = consuming.subscribe(queue, ack="client-individual", prefetch=1)
        consumer = _Consumer(subscription, consuming.ack, consumer_delay)
        worker = threading.Thread(target=consumer.run, name="flow-consumer", daemon=True)
        worker.start()
        try:
            with open_stomp(settings, participant="flow-producer") as producer:
                start = time.monotonic()
                for seq in range(messages):
                    sent_at = time.perf_counter()
                    producer.send(queue, BODY, {"seq": str(seq)}, receipt_timeout=timeout)
                    latencies.append((time.perf_counter() - sent_at) * 1000)
                seconds = time.monotonic() - start
            backlog = messages - consumer.consumed
            consumer.slow = False  # drain the rest at once: leave nothing on the queue
            deadline = time.monotonic() + timeout
            while consumer.consumed < messages and consumer.error is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{queue}: {messages - consumer.consumed} left unconsumed")
                time.sleep(0.01)
        finally:
            consumer.stop.set()
            worker.join(10)
    if consumer.error is not None:
        raise RuntimeError(f"the consumer of {queue} failed: {consumer.error!r}")
    return FlowResult(
        case=case.name,
        flow_control=case.flow_control,
        consumer_delay_ms=consumer_delay * 1000,
        messages=messages,
        seconds=seconds,
        sends_per_s=messages / seconds if seconds else 0.0,
        send_ms=percentiles(latencies),
        backlog=backlog,
    )


@dataclass
class StallResult:
    """A consumer that stops: how far its producer got before and after it resumed."""

    flow_control: bool
    messages: int
    #: Sends receipted while the consumer held its first message and took no other.
    receipted_while_stalled: int
    #: Sends receipted in all, once the consumer had resumed and drained the queue.
    receipted: int
    #: Seconds without a receipt after which the producer counted as blocked.
    patience: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def send_while_stalled(
    settings: Settings,
    *,
    flow_control: bool,
    messages: int = 150,
    patience: float = 3.0,
    timeout: float = 60.0,
) -> StallResult:
    """One producer, and a consumer that stalls: how many sends the broker receipts meanwhile.

    The consumer takes its first message (prefetch 1) and acknowledges nothing;
    the producer sends ``messages`` messages, each awaiting its receipt. When no
    receipt has come for ``patience`` seconds, or all have, the consumer resumes
    and drains the queue, and the producer finishes.
    """
    queue = queue_for(FlowCase("stalled", flow_control=flow_control, slow=True))
    progress = threading.Condition()
    receipted = 0
    failure: list[BaseException] = []

    def produce() -> None:
        nonlocal receipted
        try:
            with open_stomp(settings, participant="flow-producer") as producer:
                for seq in range(messages):
                    producer.send(queue, BODY, {"seq": str(seq)}, receipt_timeout=timeout)
                    with progress:
                        receipted += 1
                        progress.notify_all()
        except BaseException as exc:  # reported below
            with progress:
                failure.append(exc)
                progress.notify_all()

    with open_stomp(settings, participant="flow-consumer") as consuming:
        subscription = consuming.subscribe(queue, ack="client-individual", prefetch=1)
        producing = threading.Thread(target=produce, name="flow-producer", daemon=True)
        producing.start()
        with progress:
            while receipted < messages and not failure:
                # Notified on every receipt: a wait that times out saw none for `patience`
                # seconds, so the broker is holding the producer.
                if not progress.wait(patience):
                    break
            while_stalled = receipted
        for _ in range(messages):
            message = subscription.get(timeout)
            if message is None:
                raise RuntimeError(f"{queue}: the resumed consumer found no more messages")
            consuming.ack(message)
        producing.join(timeout)
    if failure:
        raise RuntimeError(f"the producer to {queue} failed: {failure[0]!r}")
    return StallResult(flow_control, messages, while_stalled, receipted, patience)
