"""The polling-interval measurement on the lab: 'twopc bench polling' with tiny counts."""

from __future__ import annotations

import pytest

from scenarios.bench import parts, polling
from scenarios.config import Settings

pytestmark = pytest.mark.lab


def test_polling_part_measures_each_interval_and_listen(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every configuration credits all its transfers; polling asks A more often at 0.05 s."""
    monkeypatch.setitem(
        polling.PLANS, True, polling.Plan((0.05, 1.0), idle=1.0, busy=1.0, rate=5.0)
    )
    result = parts.part("polling").run(settings, quick=True)
    rows = result["configurations"]
    assert [row["label"] for row in rows][:2] == ["poll 0.05 s", "poll 1 s"]
    assert rows[-1]["listen"] and not rows[0]["listen"]
    for row in rows:
        assert row["transfers"] == 5 and row["not_credited"] == 0
        assert set(row["sent_ms"]) == set(row["credited_ms"]) == {"p50", "p99"}
    assert rows[0]["queries_per_s_idle"] > rows[1]["queries_per_s_idle"]
    (section,) = parts.part("polling").sections(result)
    assert len(section.rows) == 3 and section.rows[-1][0].startswith("LISTEN/NOTIFY")
