"""Order on the real lab: per-account order of credits with one consumer, competing
consumers and message groups; CDC's commit order; a slow consumer and producer flow control.
"""

from __future__ import annotations

import pytest

from scenarios import commit_order, flow_control, ordering
from scenarios.bench import parts, report_pages
from scenarios.config import Settings
from scenarios.transfer import model as scenario
from scenarios.wiring import open_stomp

pytestmark = pytest.mark.lab


def test_one_consumer_applies_each_accounts_credits_in_the_order_sent(settings: Settings) -> None:
    """One consumer on the queue: every credit applied, none after a later one of its account."""
    result = ordering.run_case(settings, ordering.ONE_CONSUMER, accounts=3, credits=10)
    assert (result.sent, result.applied, result.violations) == (30, 30, 0)


def test_competing_consumers_apply_a_later_credit_before_an_earlier_one(
    settings: Settings,
) -> None:
    """Competing consumers, one holding its credit until overtaken: the broker lets it happen."""
    result = ordering.run_case(settings, ordering.COMPETING, accounts=1, credits=10, hold=10.0)
    assert result.applied == 10 and result.split_accounts == 1
    assert result.violations > 0


def test_message_groups_keep_each_accounts_credits_on_one_consumer_in_order(
    settings: Settings,
) -> None:
    """JMSXGroupID = account: each account's credits go to one consumer and keep their order."""
    result = ordering.run_case(settings, ordering.GROUPED, accounts=4, credits=5, hold=0.05)
    assert (result.applied, result.violations, result.split_accounts) == (20, 0, 0)
    assert sum(result.per_consumer) == 20


def test_cdc_delivers_transactions_in_commit_order_not_start_order(settings: Settings) -> None:
    """Transactions committed out of start order come out of the pgoutput slot in commit order."""
    result = commit_order.run(settings.pg_a, pairs=4)
    assert [seq for seq, _, _ in result.decoded] == list(range(1, 9))
    assert [started for _, started, _ in result.decoded] == [2, 1, 4, 3, 6, 5, 8, 7]
    xids = [xid for _, _, xid in result.decoded]
    assert all(xids[i] > xids[i + 1] for i in range(0, 8, 2))
    assert (result.commit_order_violations, result.start_order_inversions) == (0, 4)


def test_a_stalled_consumer_blocks_its_producer_only_with_flow_control_on(
    settings: Settings,
) -> None:
    """Flow-limited queue: the broker withholds receipts once its memory is full; the default
    queue takes every message while the consumer stalls."""
    limited = flow_control.send_while_stalled(settings, flow_control=True, messages=120)
    assert 0 < limited.receipted_while_stalled < 120 and limited.receipted == 120
    default = flow_control.send_while_stalled(settings, flow_control=False, messages=120)
    assert default.receipted_while_stalled == default.receipted == 120


@pytest.mark.parametrize("name", ["ordering", "flow-control"])
def test_the_parts_run_quick_and_render_their_sections(settings: Settings, name: str) -> None:
    """'twopc bench ordering' and 'flow-control' quick: results of the right shape, rendered."""
    result = parts.part(name).run(settings, quick=True)
    page = report_pages.part_markdown(name, result, f"twopc bench {name} --quick")
    assert page.startswith(f"# twopc bench {name}\n")
    if name == "ordering":
        violations = {case["case"]: case["violations"] for case in result["queue"]}
        assert violations[ordering.ONE_CONSUMER.name] == violations[ordering.GROUPED.name] == 0
        assert result["cdc"]["commit_order_violations"] == 0
        assert "| one consumer | 1 | no |" in page
    else:
        cases = {case["case"]: case for case in result["cases"]}
        assert set(cases) == {case.name for case in flow_control.CASES}
        slow = cases[flow_control.SLOW_LIMITED.name]
        assert slow["backlog"] < slow["messages"]  # the memory limit bounds what waits
        stalled = {s["flow_control"]: s for s in result["stalled"]}
        assert stalled[True]["receipted_while_stalled"] < stalled[False]["receipted_while_stalled"]


def test_a_group_stays_with_its_consumer_and_moves_on_whole_when_that_consumer_goes(
    settings: Settings,
) -> None:
    """A group's messages wait for their consumer while another is idle; when it goes, the
    other consumer takes the group over, the unacknowledged message first."""
    queue = f"/queue/ordering.takeover.{scenario.new_run_id()}"
    group = {ordering.GROUP_HEADER: "acc-takeover"}
    with (
        open_stomp(settings, participant="group-owner") as first,
        open_stomp(settings, participant="group-producer") as producer,
    ):
        owned = first.subscribe(queue, ack="client-individual", prefetch=1)
        producer.send(queue, "1", group, receipt_timeout=10.0)
        message = owned.get(10.0)
        assert message is not None and message.body == "1"
        first.ack(message)
        with open_stomp(settings, participant="group-heir") as second:
            heir = second.subscribe(queue, ack="client-individual", prefetch=10)
            for n in range(2, 6):
                producer.send(queue, str(n), group, receipt_timeout=10.0)
            held = owned.get(10.0)
            assert held is not None and held.body == "2"  # the group's owner, though busy
            first.close()  # gone with 2 unacknowledged: the group moves to the other consumer
            bodies = []
            for _ in range(4):
                taken = heir.get(10.0)
                assert taken is not None
                bodies.append(taken.body)
                second.ack(taken)
    assert bodies == ["2", "3", "4", "5"]
