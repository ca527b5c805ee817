"""The README is an overview: what twopc is, a quickstart that runs, the two commands, links.

The quickstart's Python block runs on the lab with its placeholder servers
replaced by the lab's (the only change made to it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from scenarios.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: The quickstart's placeholders, and what stands in for each on the lab.
PLACEHOLDERS = {
    '"host=db1 dbname=shop"': "PG_A",
    '"host=db2 dbname=shop"': "PG_B",
    '"mq1:61613"': "STOMP",
    'login="shop", passcode="secret"': "**STOMP_OPTIONS",
}


def sections() -> list[str]:
    """The titles of the README's second-level sections, in order."""
    return re.findall(r"^## (.+)$", README.read_text(), re.M)


def section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def quickstart() -> str:
    """The Python block of the README's quickstart."""
    (code,) = re.findall(r"```python\n(.*?)```", section("Quickstart"), flags=re.S)
    return code


def test_the_readme_opens_with_what_twopc_is_a_quickstart_and_the_two_commands() -> None:
    """Before any section the README says what twopc is; then the quickstart, then the commands."""
    intro = README.read_text().split("\n## ", 1)[0]
    assert "two-phase-commit coordinator" in intro
    assert sections()[:2] == ["Quickstart", "The two commands"], sections()
    commands = section("The two commands")
    for command in ("make demo", "make test", "make unit", ".ci/run"):
        assert command in commands, command


def test_the_quickstart_is_an_install_and_about_ten_lines_of_python() -> None:
    """The quickstart installs the distribution and runs one transaction in about ten lines."""
    assert 'pip install "twopc-coordinator' in section("Quickstart")
    lines = [line for line in quickstart().splitlines() if line.strip()]
    assert len(lines) <= 12, lines
    code = quickstart()
    assert code.count("tx.execute(") == 2 and code.count("tx.send(") == 1
    assert all(placeholder in code for placeholder in PLACEHOLDERS), code


def test_the_readme_says_which_packages_are_the_library() -> None:
    """The README names coordinator and participants as the library, scenarios as the tool."""
    intro = " ".join(README.read_text().split("\n## ", 1)[0].split())
    assert "`coordinator`" in intro and "`participants`" in intro and "`scenarios`" in intro
    assert "are the library, its public API" in intro and "is the tool's" in intro


def test_the_measurements_live_in_docs_benchmarks() -> None:
    """The README holds no measurements; docs/benchmarks.md does, and the README links it."""
    readme = README.read_text()
    assert "(docs/benchmarks.md)" in readme
    assert "p50" not in readme and "msg/s" not in readme
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    for figure in ("twopc bench", "twopc torture --schedules 500 --seed 7", "887/s", "02bed14"):
        assert figure in benchmarks, figure


@pytest.mark.lab
def test_the_quickstart_runs_on_the_lab(settings: Settings, tmp_path: Path) -> None:
    """The quickstart commits its rows in both databases (its placeholders pointed at the lab)."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS ledger (id text, amount int)")
    code = quickstart()
    for placeholder, name in PLACEHOLDERS.items():
        code = code.replace(placeholder, name)
    prelude = (
        f"PG_A, PG_B, STOMP = {settings.pg_a!r}, {settings.pg_b!r}, {settings.stomp!r}\n"
        f"STOMP_OPTIONS = {dict(settings.stomp_options())!r}\n"
    )
    script = tmp_path / "quickstart.py"
    script.write_text(prelude + code + "print(tx.gtrid)\n")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    gtrid = done.stdout.strip()
    for dsn, amount in ((settings.pg_a, -10), (settings.pg_b, 10)):
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT amount FROM ledger WHERE id = %s", (gtrid,)).fetchall()
        assert rows == [(amount,)], (dsn, rows)
