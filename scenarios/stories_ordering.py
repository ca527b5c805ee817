"""Stories of order and of the push model: credits to one account kept in order or
overtaken, CDC's commit order, and a slow consumer holding up its producer."""

from __future__ import annotations

from scenarios import commit_order, flow_control, ordering
from scenarios.config import Settings
from scenarios.lab.templates import FLOW_LIMITED_MEMORY, FLOW_LIMITED_PREFIX
from scenarios.story_kit import Story

#: Credits per account, and accounts, of the ordering story.
CREDITS, ACCOUNTS = 10, 4


def credits_keep_their_order(settings: Settings) -> Story:
    """Credits in order: kept by one consumer, lost by competing ones, kept by groups and CDC.

    Credits to one account are sent in order; one consumer applies them in that order,
    competing consumers do not, ActiveMQ's message groups do again; CDC delivers
    transactions in commit order.
    """
    story = Story("credits-keep-their-order")
    total = CREDITS * ACCOUNTS
    story.say(
        f"{ACCOUNTS} accounts get {CREDITS} credits each, sent in order (seq 1..{CREDITS}) to "
        "a queue; B applies each with one UPDATE of the account's row and counts a credit "
        "applied after a later one of its account (a violation)"
    )
    one = ordering.run_case(settings, ordering.ONE_CONSUMER, accounts=ACCOUNTS, credits=CREDITS)
    story.expect(
        one.applied == total and one.violations == 0,
        f"one consumer: {one.applied} of {total} applied, {one.violations} violations",
    )
    # The slow consumer lets go of a credit once a later one of its account is applied:
    # where the broker hands an account's credits to two consumers, that is certain.
    competing = ordering.run_case(
        settings, ordering.COMPETING, accounts=ACCOUNTS, credits=CREDITS, hold=5.0
    )
    story.expect(
        competing.applied == total and competing.violations > 0,
        f"3 competing consumers, one slow (it holds each credit until a later credit of its "
        f"account is applied elsewhere, at most 5 s): {competing.violations} credits applied "
        f"after a later one; {competing.split_accounts} of {ACCOUNTS} accounts served by "
        f"several consumers (credits per consumer {competing.per_consumer})",
    )
    grouped = ordering.run_case(
        settings, ordering.GROUPED, accounts=ACCOUNTS, credits=CREDITS, hold=0.05
    )
    story.expect(
        grouped.applied == total and grouped.violations == 0 and grouped.split_accounts == 0,
        f"the same 3 consumers, each credit sent with {ordering.GROUP_HEADER}=<account> (the "
        f"slow one now waits 50 ms per credit: nothing can overtake it): "
        f"{grouped.violations} violations; each account served by one consumer "
        f"(credits per consumer {grouped.per_consumer})",
    )
    cdc = commit_order.run(settings.pg_a, pairs=5)
    xids = ", ".join(str(xid) for _, _, xid in cdc.decoded)
    story.expect(
        cdc.commit_order_violations == 0 and cdc.start_order_inversions == 5,
        f"CDC: 5 pairs of credits to one account committed on A, in each pair the transaction "
        f"begun first committing second; the pgoutput slot yields them in commit order "
        f"(seq {', '.join(str(seq) for seq, _, _ in cdc.decoded)}; xids {xids}): "
        f"{cdc.commit_order_violations} commit-order violations, "
        f"{cdc.start_order_inversions} out of start order",
    )
    story.expect(
        one.violations == grouped.violations == cdc.commit_order_violations == 0,
        "evidence: B's ordering_accounts and A's slot agree: order kept by one consumer, by "
        "message groups and by CDC; lost by competing consumers without groups",
    )
    return story


def slow_consumer_holds_producer(settings: Settings) -> Story:
    """Producer flow control on: a slow or stalled consumer holds up its producer.

    With flow control off (the lab's default) the backlog grows in the broker instead.
    """
    story = Story("slow-consumer-holds-producer")
    story.say(
        f"queues {FLOW_LIMITED_PREFIX}* have producerFlowControl on and a memory limit of "
        f"{FLOW_LIMITED_MEMORY}; the lab's other queues have it off"
    )
    limited = flow_control.send_while_stalled(settings, flow_control=True)
    story.expect(
        limited.receipted_while_stalled < limited.messages == limited.receipted,
        f"flow control on: the consumer stalls; the producer's sends got "
        f"{limited.receipted_while_stalled} of {limited.messages} receipts, then none for "
        f"{limited.patience:g} s (the broker holds them); the consumer resumes and the "
        f"producer finishes ({limited.receipted} receipted)",
    )
    default = flow_control.send_while_stalled(settings, flow_control=False)
    story.expect(
        default.receipted_while_stalled == default.messages,
        f"flow control off: the same stalled consumer; the producer sent all "
        f"{default.receipted_while_stalled} and the backlog waits in the broker's store",
    )
    fast = flow_control.run_case(settings, flow_control.FAST_LIMITED, messages=150)
    slow = flow_control.run_case(settings, flow_control.SLOW_LIMITED, messages=150)
    for result in (fast, slow):
        story.say(
            f"{result.case} ({result.consumer_delay_ms:.0f} ms per message): the producer "
            f"sent {result.sends_per_s:.0f}/s, SEND-to-receipt p50 {result.send_ms['p50']:.1f} "
            f"ms, p99 {result.send_ms['p99']:.1f} ms"
        )
    story.expect(
        limited.receipted_while_stalled < default.receipted_while_stalled,
        f"evidence: receipts while the consumer stalled: {limited.receipted_while_stalled} with "
        f"flow control on, {default.receipted_while_stalled} with it off",
    )
    return story
