"""The API reference builds from the docstrings: a pdoc page for every module of the library.

``scripts/apidocs.py`` (``make apidocs``) is run into a temporary folder, with
warnings as errors. The build fails on a module that does not import; the checks
here fail on a module without its page and on a docstring pdoc could not render
(a reStructuredText role left as text, e.g. ``:clas:`X```).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "apidocs.py"
PACKAGES = ("coordinator", "participants", "outbox")
DOCSTRING = re.compile(r'<div class="docstring">(.*?)</div>', re.S)
#: What pdoc leaves of a role it could not resolve: ``:name:`` before the code it wraps.
UNRENDERED = re.compile(r":[\w:]+:<code>")


def build(output: Path, *packages: str, path: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run scripts/apidocs.py for ``packages`` into ``output``, warnings as errors."""
    return subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT), str(output), *packages],
        cwd=path,
        env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=240,
    )


def module_files(root: Path, packages: tuple[str, ...]) -> list[str]:
    """The dotted name of every module file in ``packages`` under ``root``."""
    names = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def problems(output: Path, root: Path, packages: tuple[str, ...]) -> list[str]:
    """Modules without a page, and docstrings with a role pdoc left unrendered."""
    found = []
    for name in module_files(root, packages):
        page = output.joinpath(*name.split(".")).with_suffix(".html")
        if not page.exists():
            found.append(f"{name}: no page")
            continue
        for docstring in DOCSTRING.findall(page.read_text()):
            found += [f"{name}: unrendered {role}" for role in UNRENDERED.findall(docstring)]
    return found


@pytest.mark.slow
def test_the_api_reference_builds_for_every_library_module(tmp_path: Path) -> None:
    """pdoc builds a page for every module of coordinator, participants and outbox, every role
    rendered."""
    done = build(tmp_path / "apidocs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "apidocs" / "index.html").exists()
    assert not problems(tmp_path / "apidocs", ROOT, PACKAGES)
    assert not (tmp_path / "apidocs" / "scenarios.html").exists(), "scenarios is the tool's"


def test_the_build_fails_on_a_module_that_does_not_import(tmp_path: Path) -> None:
    """A module of the package that cannot be imported fails the build."""
    package = tmp_path / "src" / "shop"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "orders.py").write_text('"""Orders."""\n\nimport no_such_module  # noqa\n')
    done = build(tmp_path / "out", "shop", path=tmp_path / "src")
    assert done.returncode != 0 and "no_such_module" in done.stderr, done.stderr


def test_the_check_sees_an_unrendered_docstring_and_a_missing_page(tmp_path: Path) -> None:
    """A role pdoc cannot render is found in the page, and a module with no page is named."""
    package = tmp_path / "src" / "shop"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "orders.py").write_text(
        '"""See :clas:`Order` and :class:`Order`."""\n\n\nclass Order:\n    """An order."""\n'
    )
    output = tmp_path / "out"
    done = build(output, "shop", path=tmp_path / "src")
    assert done.returncode == 0, done.stderr
    assert problems(output, tmp_path / "src", ("shop",)) == ["shop.orders: unrendered :clas:<code>"]
    (output / "shop" / "orders.html").unlink()
    assert problems(output, tmp_path / "src", ("shop",)) == ["shop.orders: no page"]
