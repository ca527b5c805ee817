"""The layering: lint-imports holds the contracts of pyproject.toml, and breaks on a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coordinator", "participants", "outbox", "scenarios")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

ENGINE = "The engine imports no participant and no scenario; participants import no scenario"
LAB = "The lab imports no transfer, outbox or strategy code"
OUTBOX = "The outbox component imports no scenario: a team uses it without the transfer scenario"
SIBLINGS = "No package imports, through others, a sibling that imports it"
MODULES = "No module imports, through others, a module that imports it"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` run in ``root``, as ``make unit`` runs it, with wide lines."""
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def copy_of_the_project(into: Path) -> Path:
    """The packages, pyproject.toml and the contract type, copied where a test may plant."""
    ignore = shutil.ignore_patterns("__pycache__")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, into / package, ignore=ignore)
    (into / "tests").mkdir()
    for name in ("__init__.py", "import_contracts.py"):
        shutil.copy(ROOT / "tests" / name, into / "tests" / name)
    shutil.copy(ROOT / "pyproject.toml", into / "pyproject.toml")
    return into


def plant(root: Path, module: str, imported: str) -> None:
    """Append to ``module`` a function that imports ``imported``: imports in functions count."""
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = root / module.replace(".", "/") / "__init__.py"
    with path.open("a") as out:
        out.write(f"\n\ndef _planted() -> None:\n    import {imported}  # noqa: F401\n")


def verdicts(output: str) -> dict[str, str]:
    """Each contract's name -> KEPT or BROKEN, from lint-imports' summary."""
    found = {}
    for line in output.splitlines():
        for verdict in ("KEPT", "BROKEN"):
            if line.endswith(" " + verdict):
                found[line.removesuffix(" " + verdict).strip()] = verdict
    return found


def test_the_layering_contracts_hold() -> None:
    """Every contract of pyproject.toml holds on the code as it is."""
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdicts(done.stdout) == {
        name: "KEPT" for name in (ENGINE, LAB, SIBLINGS, MODULES, OUTBOX)
    }


@pytest.mark.parametrize(
    ("module", "imported", "broken"),
    [
        ("coordinator.states", "participants.fake", {ENGINE}),
        ("coordinator.driver", "scenarios.config", {ENGINE}),
        ("participants.fake", "scenarios.config", {ENGINE}),
        ("scenarios.lab.procfs", "scenarios.outbox.deadletter", {LAB}),
        ("scenarios.lab.proxy", "scenarios.strategies.base", {LAB}),
        ("scenarios.transfer.model", "scenarios.stories", {SIBLINGS, MODULES}),
        ("scenarios.strategies.base", "scenarios.strategies", {MODULES}),
        ("outbox.clean", "scenarios.config", {OUTBOX}),
        ("participants.fake", "outbox.tables", {OUTBOX}),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    tmp_path: Path, module: str, imported: str, broken: set[str]
) -> None:
    """An import planted inside a function of a copy breaks the contract it violates."""
    root = copy_of_the_project(tmp_path)
    plant(root, module, imported)
    done = lint_imports(root)
    assert done.returncode != 0, done.stdout
    found = verdicts(done.stdout)
    assert {name for name, verdict in found.items() if verdict == "BROKEN"} >= broken, done.stdout
    assert f"{module} -> {imported} (l." in done.stdout, "the planted import is not named"
