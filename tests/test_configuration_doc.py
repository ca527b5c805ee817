"""docs/configuration.md lists exactly the TWOPC_ settings the code reads; the README links it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
PACKAGES = ("coordinator", "participants", "scenarios")
#: A whole setting name: TWOPC_ and capitals, digits or underscores, not ending in one
#: (``f"TWOPC_PG_{name}"`` builds TWOPC_PG_A and TWOPC_PG_B, which are spelled out too).
SETTING = re.compile(r"TWOPC_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])")


def settings_in_code() -> dict[str, str]:
    """Every TWOPC_ name in a string of the packages' code (not a docstring): name -> file."""
    found: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            docstrings = {
                id(node.body[0].value)
                for node in ast.walk(tree)
                if isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                )
                and node.body
                and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)
            }
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and id(node) not in docstrings
                ):
                    for name in SETTING.findall(node.value):
                        found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def settings_in_doc() -> set[str]:
    """The settings docs/configuration.md lists: the first column of its tables."""
    rows = re.findall(r"^\| `(TWOPC_[A-Z0-9_]+)` \|", DOC.read_text(), re.MULTILINE)
    return set(rows)


def test_every_setting_the_code_reads_is_documented() -> None:
    """A TWOPC_ setting in the code that docs/configuration.md does not list fails, named."""
    documented = settings_in_doc()
    missing = {name: where for name, where in settings_in_code().items() if name not in documented}
    assert not missing, f"undocumented settings (add them to docs/configuration.md): {missing}"


def test_every_documented_setting_is_read_by_the_code() -> None:
    """A setting docs/configuration.md lists that no code reads fails, named."""
    stale = settings_in_doc() - set(settings_in_code())
    assert not stale, f"documented settings nothing reads: {sorted(stale)}"


def test_the_settings_that_were_undocumented_are_listed() -> None:
    """The lab's binaries, the outbox's retries and the metrics address have their rows."""
    documented = settings_in_doc()
    for name in (
        "TWOPC_PG_BINDIR",
        "TWOPC_ACTIVEMQ_JAR",
        "TWOPC_OUTBOX_MAX_ATTEMPTS",
        "TWOPC_OUTBOX_BACKOFF",
        "TWOPC_METRICS_ADDRESS",
    ):
        assert name in documented, name


def test_the_readme_links_the_configuration_reference() -> None:
    """README.md points to docs/configuration.md."""
    assert "(docs/configuration.md)" in (ROOT / "README.md").read_text()


def test_the_check_catches_a_setting_left_out() -> None:
    """The scan sees names in constants and f-strings, and not in docstrings."""
    tree_source = 'def f():\n    """TWOPC_IN_A_DOCSTRING"""\n    return "TWOPC_READ"\n'
    names = set()
    for node in ast.walk(ast.parse(tree_source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.update(SETTING.findall(node.value))
    assert "TWOPC_READ" in names
    assert "TWOPC_METRICS_ADDRESS" in settings_in_code()
    assert "TWOPC_PG_" not in settings_in_code()
