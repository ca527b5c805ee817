"""The report's flow-control part: the push model's danger, a slow consumer holding up its
producer once producer flow control is on.

``twopc bench flow-control`` runs it alone. The cases are scenarios.flow_control's:
one producer awaiting each SEND's receipt, one consumer, fast or slow, on a
flow-limited queue and on a queue of the lab's default policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scenarios import flow_control
from scenarios.bench.section import Section
from scenarios.config import Settings
from scenarios.lab.templates import FLOW_LIMITED_MEMORY, FLOW_LIMITED_PREFIX

#: Messages per case, normal and quick.
MESSAGES = {False: 1_000, True: 200}
#: The slow consumer's time per message.
DELAY = 0.02


def run(settings: Settings, *, quick: bool) -> dict[str, Any]:
    messages = MESSAGES[quick]
    cases = [
        flow_control.run_case(settings, case, messages=messages, delay=DELAY).as_dict()
        for case in flow_control.CASES
    ]
    stalled = [
        flow_control.send_while_stalled(settings, flow_control=on).as_dict() for on in (True, False)
    ]
    return {"cases": cases, "stalled": stalled, "memory_limit": FLOW_LIMITED_MEMORY}


def sections(result: Mapping[str, Any]) -> list[Section]:
    rows = [
        [
            case["case"],
            f"{case['consumer_delay_ms']:.0f}",
            str(case["messages"]),
            f"{case['sends_per_s']:.0f}",
            f"{case['send_ms']['p50']:.1f}",
            f"{case['send_ms']['p99']:.1f}",
            f"{case['send_ms']['max']:.1f}",
            str(case["backlog"]),
        ]
        for case in result["cases"]
    ]
    stalled = {s["flow_control"]: s for s in result["stalled"]}
    on, off = stalled[True], stalled[False]
    note = (
        f"One producer sends persistent messages to a queue of its own, awaiting each "
        f"SEND's receipt (as a JMS producer of persistent messages does); one consumer ACKs "
        f"each message (client-individual, prefetch 1), the slow one after "
        f"{DELAY * 1000:.0f} ms. Flow control on: a queue {FLOW_LIMITED_PREFIX}* "
        f"(producerFlowControl, memoryLimit {result['memory_limit']}, messages held in "
        "memory); off: the lab's default policy. 'Backlog' is what the consumer had not "
        "processed when the producer finished. With flow control on, the slow consumer's "
        "pace becomes the producer's; with it off, the producer is unaffected and the "
        f"backlog waits in the broker's store. A consumer that stalls altogether: with "
        f"flow control on, the producer got {on['receipted_while_stalled']} of "
        f"{on['messages']} receipts, then none for {on['patience']:g} s until the consumer "
        f"resumed; with it off, {off['receipted_while_stalled']} of {off['messages']}."
    )
    return [
        Section(
            "The push model: a slow consumer and producer flow control",
            [
                "case",
                "consumer ms/message",
                "messages",
                "producer sends/s",
                "send p50 ms",
                "send p99 ms",
                "send max ms",
                "backlog",
            ],
            rows,
            note=note,
        )
    ]
