"""Sync/asyncio twins written by hand share almost no code: the shared part is generated."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_unasync import load_generator

ROOT = Path(__file__).resolve().parent.parent

#: An asyncio module and its synchronous twin, where neither is generated from the other.
HAND_WRITTEN_PAIRS = {
    "participants/aio/fake.py": "participants/fake.py",
    "participants/aio/recovery_view.py": "participants/recovery_view.py",
    "participants/aio/stomp.py": "participants/stomp_client.py",
}
LIMIT = 60  # shared lines of 25 characters or more, over all hand-written pairs
MIN_LENGTH = 25


def generated(path: Path) -> bool:
    return any(line.startswith("# Generated from ") for line in path.read_text().splitlines()[:3])


def normalised_lines(path: Path) -> set[str]:
    """The module's lines with async/await and the Async/A prefixes dropped, long ones only."""
    lines = set()
    for line in path.read_text().splitlines():
        line = re.sub(r"\b(async|await)\s+", "", line).strip()
        line = re.sub(r"\bAsync(?=[A-Z])", "", line)
        line = line.replace("__aenter__", "__enter__").replace("__aexit__", "__exit__")
        if len(line) >= MIN_LENGTH:
            lines.add(line)
    return lines


def pairs() -> dict[str, str]:
    """Every asyncio module with its twin: the generated ones and the hand-written ones."""
    return {**load_generator().FILES, **HAND_WRITTEN_PAIRS}


def shared_lines(source: str, twin: str) -> set[str]:
    return normalised_lines(ROOT / source) & normalised_lines(ROOT / twin)


def test_every_asyncio_module_is_paired() -> None:
    """Each module of an ``aio`` package is generated or listed here, so none escapes the count."""
    found = {
        str(path.relative_to(ROOT))
        for package in ("coordinator", "participants")
        for path in (ROOT / package / "aio").glob("*.py")
        if path.name != "__init__.py"
    }
    assert found <= set(pairs()), sorted(found - set(pairs()))
    for twin in pairs().values():
        assert (ROOT / twin).exists(), twin


def test_hand_written_twins_share_under_the_limit() -> None:
    """Hand-written twins (generated ones aside) have under 60 long lines in common."""
    counts = {
        f"{source} ~ {twin}": len(shared_lines(source, twin))
        for source, twin in pairs().items()
        if not generated(ROOT / twin)
    }
    assert sum(counts.values()) < LIMIT, counts
