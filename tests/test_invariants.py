"""The transfer's invariant checker on evidence built by hand (no services needed)."""

from __future__ import annotations

from collections import Counter

from scenarios.transfer.invariants import Evidence, atomicity_violations


def evidence(**overrides: object) -> Evidence:
    fields: dict[str, object] = {
        "total_expected": 100,
        "total_now": 100,
        "amounts_a": {"t1": 5, "t2": 7},
        "amounts_b": {"t1": 5, "t2": 7},
        "on_queue": Counter({"t1": 1, "t2": 1}),
        "prepared": [],
        "markers": set(),
    }
    fields.update(overrides)
    return Evidence(**fields)  # type: ignore[arg-type]


def test_a_consistent_run_holds_every_invariant() -> None:
    """A, B and the queue agree, money is conserved: ok, and nothing is reported."""
    found = evidence()
    assert found.ok and found.anomalies() == [] and found.lost_messages == []
    assert found.as_dict()["atomicity_violations"] == 0


def test_a_transfer_missing_anywhere_or_with_two_amounts_breaks_atomicity() -> None:
    """Missing from B, only on the queue, or with different amounts in A and B: a violation."""
    found = evidence(
        amounts_a={"t1": 5, "t2": 7, "t3": 1},
        amounts_b={"t1": 5, "t2": 8},
        on_queue=Counter({"t1": 1, "t2": 1, "t3": 1, "t4": 1}),
    )
    assert found.atomicity_violations == ["t2", "t3", "t4"]
    assert not found.ok


def test_a_message_delivered_twice_is_a_duplicate() -> None:
    """Two messages for one transfer on the queue: a duplicate, and not ok."""
    found = evidence(on_queue=Counter({"t1": 2, "t2": 1}))
    assert found.duplicates == ["t1"] and not found.ok
    assert found.as_dict()["duplicate_messages"] == 1


def test_money_not_conserved_and_prepared_branches_fail_the_check() -> None:
    """A sum of balances that moved, or a branch left prepared, fails ok; money is an anomaly."""
    assert evidence(total_now=99).anomalies() == ["money"]
    assert not evidence(prepared=["a:twopc-x"]).ok


def test_with_an_inbox_the_applied_rows_are_the_deliveries() -> None:
    """Asynchronous strategies: the inbox, not the queue, says what was delivered."""
    found = evidence(
        on_queue=Counter(),
        inbox={"t1": ("applied", 2), "t2": ("rejected", 0)},
        pending=3,
    )
    assert found.atomicity_violations == ["t2"] and found.duplicates == []
    shown = found.as_dict()
    assert shown["duplicates_absorbed"] == 2 and shown["outbox_pending"] == 3
    assert shown["inbox_rows"] == 2 and shown["failure_log"] == 0


def test_lost_messages_are_in_a_and_b_but_never_delivered() -> None:
    """A transfer in both databases with no message is lost (and breaks atomicity)."""
    found = evidence(on_queue=Counter({"t1": 1}))
    assert found.lost_messages == ["t2"] and found.atomicity_violations == ["t2"]


def test_the_atomicity_rule_also_takes_plain_mappings() -> None:
    """The rule itself works on any id -> amount mappings and any delivered collection."""
    assert atomicity_violations({"x": 1}, {"x": 1}, {"x"}) == []
    assert atomicity_violations({"x": 1}, {}, set(), {"y"}) == ["x", "y"]
