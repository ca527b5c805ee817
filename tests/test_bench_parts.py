"""The report's further parts: run alone as 'twopc bench NAME' or inside the report."""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from typing import Any

import pytest

from coordinator.errors import ConfigurationError
from scenarios.bench import parts, report_pages
from scenarios.bench.section import Section


def _demo_module() -> types.ModuleType:
    module = types.ModuleType("scenarios.bench._demo_part")

    def run(settings: Any, *, quick: bool) -> dict[str, Any]:
        return {"quick": quick, "figure": 41.5}

    def sections(result: Mapping[str, Any]) -> list[Section]:
        return [Section("Demo figures", ["what", "value"], [["figure", str(result["figure"])]])]

    module.run = run  # type: ignore[attr-defined]
    module.sections = sections  # type: ignore[attr-defined]
    return module


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> parts.Part:
    monkeypatch.setitem(sys.modules, "scenarios.bench._demo_part", _demo_module())
    part = parts.Part("demo", "A demonstration part.", "_demo_part")
    monkeypatch.setattr(parts, "PARTS", (part,))
    return part


def test_a_part_runs_and_renders_its_sections_alone(demo: parts.Part) -> None:
    """A part's result renders as its own Markdown page with its sections."""
    result = parts.part("demo").run(None, quick=True)  # type: ignore[arg-type]
    page = report_pages.part_markdown("demo", result, "twopc bench demo --quick")
    assert result == {"quick": True, "figure": 41.5}
    assert page.startswith("# twopc bench demo\n")
    assert "## Demo figures" in page and "| figure | 41.5 |" in page


def test_the_report_shows_a_part_after_its_own_sections(demo: parts.Part) -> None:
    """The comparison report renders each part's sections from data['parts']."""
    data = {
        "strategies": {},
        "crashes": {},
        "verdict": [],
        "plan": {"repeats": 1, "latency_count": 1, "concurrencies": [1], "rates": [], "seconds": 1},
        "parts": {"demo": {"figure": 7}},
        "machine": {
            "cpu": "x",
            "cores": 2,
            "memory": "1 GB",
            "os": "linux",
            "python": "3",
            "postgresql": {},
            "activemq": "5",
            "activemq_journal": "synced",
            "packages": {},
            "git_commit": "abc",
            "load_average": [0.0],
        },
        "load_after": [0.0],
    }
    titles = [s.title for s in report_pages.sections(data, {})]
    assert titles.index("Demo figures") == titles.index("Machine and versions") - 1


def test_an_unknown_part_names_the_known_ones(demo: parts.Part) -> None:
    """Asking for a part that does not exist is a ConfigurationError listing the parts."""
    with pytest.raises(ConfigurationError, match="unknown bench part 'nope'; one of: demo"):
        parts.part("nope")
