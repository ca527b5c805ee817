"""The report's ordering part: per-account order of credits on a queue with one consumer,
competing consumers and message groups, and CDC's commit order, violations counted.

``twopc bench ordering`` runs it alone. The cases are scenarios.ordering's and
scenarios.commit_order's; one run of each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scenarios import commit_order, ordering
from scenarios.bench.section import Section
from scenarios.config import Settings

#: (accounts, credits per account, CDC pairs), normal and quick.
SIZES = {False: (10, 100, 50), True: (4, 25, 10)}
#: How long the slow consumer holds a credit at most (unless a later one overtakes it).
HOLD = 0.05


def run(settings: Settings, *, quick: bool) -> dict[str, Any]:
    accounts, credits, pairs = SIZES[quick]
    queue = [
        ordering.run_case(settings, case, accounts=accounts, credits=credits, hold=HOLD).as_dict()
        for case in ordering.CASES
    ]
    cdc = commit_order.run(settings.pg_a, pairs=pairs).as_dict()
    cdc.pop("decoded")
    return {"hold_ms": HOLD * 1000, "queue": queue, "cdc": cdc, "cdc_pairs": pairs}


def sections(result: Mapping[str, Any]) -> list[Section]:
    rows = [
        [
            case["case"],
            str(case["consumers"]),
            "yes" if case["groups"] else "no",
            f"{case['applied']} of {case['sent']}",
            str(case["violations"]),
            f"{case['split_accounts']} of {case['accounts']}",
            " / ".join(str(n) for n in case["per_consumer"]),
            f"{case['seconds']:.2f}",
        ]
        for case in result["queue"]
    ]
    cdc = result["cdc"]
    rows.append(
        [
            "CDC (pgoutput slot), commits out of start order",
            "1 slot reader",
            "-",
            f"{cdc['transactions']} of {2 * result['cdc_pairs']}",
            str(cdc["commit_order_violations"]),
            "-",
            "-",
            "-",
        ]
    )
    first = result["queue"][0]
    note = (
        f"{first['accounts']} accounts get {first['sent'] // first['accounts']} credits each, "
        "sent in order (seq 1, 2, ...) to one queue. B applies each credit with one UPDATE of "
        "the account's row and counts a violation when a later credit of the account was "
        "applied before it. Consumers: each its own STOMP connection, client-individual ACK, "
        f"prefetch 1. With competing consumers one is slow: it holds each credit up to "
        f"{result['hold_ms']:.0f} ms, letting go as soon as another consumer applied a later "
        "credit of the same account. Message groups: each credit sent with the header "
        "JMSXGroupID = its account; ActiveMQ gives a group to one consumer while it lives. "
        "'split' counts accounts whose credits several consumers applied. CDC: pairs of "
        "credits to one account committed on A, in each pair the transaction begun first "
        f"committing second; the slot yielded {cdc['start_order_inversions']} credits out of "
        "start order and none out of commit order. Order is promised by one consumer, by "
        "message groups and by CDC (0 violations); competing consumers without groups "
        "promise none."
    )
    return [
        Section(
            "Ordering: per-account order of credits",
            [
                "case",
                "consumers",
                "groups",
                "applied",
                "order violations",
                "accounts split",
                "credits per consumer",
                "seconds",
            ],
            rows,
            note=note,
            text_columns=(0, 1, 2, 3, 5, 6),
        )
    ]
