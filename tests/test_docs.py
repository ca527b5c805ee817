"""The docs' examples run as written: every python block of docs/api.md against the lab."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scenarios.config import Settings

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"


def examples() -> list[tuple[str, str]]:
    """(section title, code) of every python block in docs/api.md, in order."""
    found = []
    for section in re.split(r"\n## ", API.read_text())[1:]:
        title = section.splitlines()[0]
        for code in re.findall(r"```python\n(.*?)```", section, flags=re.S):
            found.append((title, code))
    return found


def test_api_doc_has_an_example_per_topic() -> None:
    """docs/api.md has runnable examples for the transaction, embedding, pools, ORM, asyncio,
    several coordinators, metrics and tracing."""
    titles = [title for title, _ in examples()]
    for topic in (
        "A global transaction",
        "Embedding",
        "pool",
        "ORM",
        "AsyncCoordinator",
        "Several coordinators",
        "Metrics",
        "Tracing",
    ):
        assert any(topic in title for title in titles), (topic, titles)


def test_readme_links_the_guides() -> None:
    """README links the API, operations and own-servers guides, and they exist."""
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/api.md", "docs/operations.md", "docs/own-servers.md"):
        assert f"({doc})" in readme and (ROOT / doc).exists(), doc


@pytest.mark.lab
@pytest.mark.parametrize(("title", "code"), examples(), ids=[t for t, _ in examples()])
def test_api_example_runs(settings: Settings, tmp_path: Path, title: str, code: str) -> None:
    """The example runs to the end on the lab and prints what it shows."""
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, **settings.as_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip(), f"{title}: printed nothing"


def test_metrics_examples_use_only_the_library_for_both_coordinators() -> None:
    """The metrics section's examples import nothing from scenarios, and there is one for
    the thread Coordinator and one for the AsyncCoordinator (both run in
    test_api_example_runs)."""
    codes = [code for title, code in examples() if title.startswith("Metrics")]
    assert codes
    for code in codes:
        assert not re.search(r"^\s*(from|import) scenarios\b", code, flags=re.M), code
        assert "from coordinator.metrics import TransactionMetrics" in code
    assert any("Coordinator(" in c and "AsyncCoordinator" not in c for c in codes)
    assert any("AsyncCoordinator(" in c for c in codes)
