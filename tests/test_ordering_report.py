"""The ordering and flow-control parts without a lab: the lab's broker policy, the order
counting, and the report sections from a result."""

from __future__ import annotations

from scenarios import commit_order
from scenarios.bench import flow_control as flow_part
from scenarios.bench import ordering as ordering_part
from scenarios.lab.templates import ACTIVEMQ_XML, FLOW_LIMITED_MEMORY, FLOW_LIMITED_PREFIX


def test_the_lab_turns_producer_flow_control_on_for_the_flow_limited_queues_alone() -> None:
    """The lab's queues keep producerFlowControl off; flow.limited.> has it on, memory bounded."""
    assert '<policyEntry queue=">" producerFlowControl="false"' in ACTIVEMQ_XML
    assert (
        f'<policyEntry queue="{FLOW_LIMITED_PREFIX}>" producerFlowControl="true" '
        f'memoryLimit="{FLOW_LIMITED_MEMORY}"'
    ) in ACTIVEMQ_XML


def test_items_delivered_after_a_greater_one_are_counted_as_out_of_order() -> None:
    """The count of items that come after a greater one: 0 in order, each overtaken one else."""
    assert commit_order.out_of_order([1, 2, 3]) == 0
    assert commit_order.out_of_order([2, 1, 4, 3]) == 2
    assert commit_order.out_of_order([3, 1, 2]) == 2


def _case(name: str, consumers: int, groups: bool, violations: int) -> dict[str, object]:
    return {
        "case": name,
        "consumers": consumers,
        "groups": groups,
        "accounts": 2,
        "sent": 10,
        "applied": 10,
        "violations": violations,
        "split_accounts": 0 if consumers == 1 or groups else 2,
        "per_consumer": [10] if consumers == 1 else [2, 4, 4],
        "seconds": 0.5,
    }


def test_the_ordering_section_shows_violations_per_case_and_cdc() -> None:
    """One row per queue case with its violations, and CDC's commit-order row."""
    result = {
        "hold_ms": 50.0,
        "queue": [_case("one consumer", 1, False, 0), _case("competing consumers", 3, False, 3)],
        "cdc": {"transactions": 4, "commit_order_violations": 0, "start_order_inversions": 2},
        "cdc_pairs": 2,
    }
    (section,) = ordering_part.sections(result)
    assert [row[0] for row in section.rows][-1].startswith("CDC")
    assert [row[4] for row in section.rows] == ["0", "3", "0"]
    assert "2 credits out of start order" in section.note


def test_the_flow_control_section_shows_producer_figures_per_case() -> None:
    """One row per case with the producer's rate and latency and the backlog; stalls noted."""
    case = {
        "case": "slow consumer, flow control on",
        "consumer_delay_ms": 20.0,
        "messages": 200,
        "sends_per_s": 50.0,
        "send_ms": {"p50": 20.0, "p99": 30.0, "max": 40.0},
        "backlog": 53,
    }
    stalled = [
        {"flow_control": True, "messages": 150, "receipted_while_stalled": 53, "patience": 3.0},
        {"flow_control": False, "messages": 150, "receipted_while_stalled": 150, "patience": 3.0},
    ]
    (section,) = flow_part.sections({"cases": [case], "stalled": stalled, "memory_limit": "64 kb"})
    assert section.rows == [
        ["slow consumer, flow control on", "20", "200", "50", "20.0", "30.0", "40.0", "53"]
    ]
    assert "53 of 150 receipts" in section.note and "150 of 150" in section.note
