"""The report's fan-out part: one ``cdc-fanout`` run, the credit command's receiver against the
event consumers, each with its lag from A's commit.

The CDC relay sends each transfer's credit command to B's one queue and its
``transfer.completed`` event once to the events' virtual topic; the audit,
notification and slow consumers each read the event from their own queue
(scenarios.outbox.fanout). ``twopc bench fanout [--quick]`` runs it alone;
``twopc bench strategies`` adds its section to the report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from scenarios.bench.section import Section
from scenarios.config import Settings

#: Transfers of a full and of a quick run, and the slow consumer's delay per message (s).
COUNT, QUICK_COUNT = 300, 60
SLOW_DELAY = 0.05


def run(settings: Settings, *, quick: bool) -> dict[str, Any]:
    """One ``cdc-fanout`` run on a reset lab; its fan-out figures and invariants."""
    from scenarios.bench.strategy_runs import reset_lab
    from scenarios.outbox.fanout import SLOW_DELAY_SETTING
    from scenarios.strategies import run_transfers
    from scenarios.transfer import model as scenario
    from scenarios.transfer.model import stored_accounts

    reset_lab(settings)
    count = QUICK_COUNT if quick else COUNT
    accounts = stored_accounts(settings) or scenario.DEFAULT_ACCOUNTS
    transfers = scenario.plan(count, accounts=accounts, seed=21)
    before = os.environ.get(SLOW_DELAY_SETTING)
    os.environ[SLOW_DELAY_SETTING] = str(SLOW_DELAY)
    try:
        output = run_transfers(settings, "cdc-fanout", transfers, concurrency=4)
    finally:
        if before is None:
            del os.environ[SLOW_DELAY_SETTING]
        else:
            os.environ[SLOW_DELAY_SETTING] = before
    return {
        "transfers": count,
        "committed": output["committed"],
        "slow_delay_s": SLOW_DELAY,
        "fanout": output.get("fanout", {}),
        "invariants_ok": bool(output.get("invariants", {}).get("ok")),
    }


def sections(result: Mapping[str, Any]) -> list[Section]:
    """The fan-out's consumers as one table."""
    fanout = result.get("fanout", {})
    rows = [
        [
            name,
            c["kind"],
            f"{c['lag_ms'].get('p50', 0):.0f}",
            f"{c['lag_ms'].get('p99', 0):.0f}",
            str(c["processed_when_b_converged"]),
            str(c["not_processed"]),
        ]
        for name, c in fanout.get("consumers", {}).items()
    ]
    note = (
        f"'twopc transfer --strategy cdc-fanout', {result.get('committed', 0)} transfers "
        f"committed at concurrency 4, the slow consumer waiting {result.get('slow_delay_s')} s "
        "per message. The CDC relay sends each transfer's credit command to "
        "/queue/transfers.credit (one receiver: the credit consumer) and its "
        "transfer.completed event once to /topic/VirtualTopic.transfers, copied to each event "
        "consumer's queue. Lag from A's commit to each consumer's processing; 'when B "
        "converged' is how many each had processed once every credit was applied. "
        f"Duplicate effects: {fanout.get('duplicate_effects', 'n/a')}; invariants "
        f"{'hold' if result.get('invariants_ok') else 'FAILED'}."
    )
    return [
        Section(
            "Fan-out: one command receiver, event consumers at their own pace",
            [
                "consumer",
                "reads",
                "lag p50 ms",
                "lag p99 ms",
                "processed when B converged",
                "not processed",
            ],
            rows,
            note=note,
            text_columns=(0, 1),
        )
    ]
