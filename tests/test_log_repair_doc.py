"""The operations guide's repair of a damaged decision log works in the order it gives.

Every ``twopc`` command the repair paragraph names before the cut runs on a
damaged log; ``twopc indoubt`` (which refuses one) comes only after the cut,
and works then.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from coordinator.log import format as fmt
from scenarios.config import Settings
from tests.test_cli_errors import twopc

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = re.compile(r"`(twopc [a-z -]+?)`")


def repair_paragraph() -> str:
    """docs/operations.md's paragraph on a log damaged in the middle."""
    guide = (ROOT / "docs" / "operations.md").read_text()
    start = guide.index("If the log is damaged in the middle")
    return guide[start : guide.index("\n\n", start)]


def commands_before_the_cut(paragraph: str) -> list[str]:
    """The twopc commands the paragraph has the user run before it says to cut the log."""
    steps = paragraph[paragraph.index("eep a copy") : paragraph.index("Cut the log")]
    return COMMANDS.findall(" ".join(steps.split()))


def damaged_log(home: Path) -> int:
    """A decision log in ``home`` with a damaged record between two good ones; its offset."""
    good = fmt.encode(fmt.Commit("tx-1", ("pg-a", "pg-b")))
    bad = bytearray(fmt.encode(fmt.Commit("tx-2", ("pg-a", "mq"))))
    bad[-1] ^= 0xFF  # a bad CRC
    offset = len(fmt.HEADER) + len(good)
    (home / "decisions.log").write_bytes(
        fmt.HEADER + good + bytes(bad) + fmt.encode(fmt.End("tx-1"))
    )
    return offset


def test_the_repair_paragraph_runs_indoubt_only_after_the_cut() -> None:
    """Before the cut the paragraph names only commands that read a damaged log."""
    paragraph = repair_paragraph()
    assert commands_before_the_cut(paragraph) == ["twopc log dump"]
    after = paragraph[paragraph.index("Cut the log") :]
    assert "`twopc indoubt`" in after


@pytest.mark.lab
def test_the_repair_paragraph_in_its_order_on_a_damaged_log(
    settings: Settings, tmp_path: Path
) -> None:
    """'twopc log dump' reads the damaged log, indoubt refuses it, and works after the cut."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    offset = damaged_log(home)
    env = {**os.environ, **settings.as_env(), "TWOPC_HOME": str(home)}
    for command in commands_before_the_cut(repair_paragraph()):
        done = twopc(env, *command.split()[1:])
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    refused = twopc(env, "indoubt")
    assert refused.returncode == 1 and "corrupt" in refused.stderr, refused.stderr
    cut = twopc(env, "log", "truncate", "--at", str(offset), "--i-know")
    assert cut.returncode == 0, cut.stderr
    after = twopc(env, "indoubt", "--json")
    assert after.returncode in (0, 3), after.stderr
