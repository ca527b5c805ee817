"""The distribution: lean core dependencies, a version, a licence, pinned tested versions."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

import coordinator

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: What only the command, the lab or the benchmarks need: never the library's own dependency.
NOT_FOR_THE_LIBRARY = {"click", "rich", "opentelemetry-sdk", "psycopg-binary", "matplotlib"}
#: Blocks importing the modules of NOT_FOR_THE_LIBRARY, then runs the script after it.
BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = ("click", "rich", "opentelemetry.sdk", "psycopg_binary", "matplotlib")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_core_dependencies_leave_out_the_command_and_the_binaries() -> None:
    """The library depends on neither click, rich, psycopg[binary] nor the OpenTelemetry SDK."""
    core = [Requirement(spec) for spec in PROJECT["dependencies"]]
    names = {normalised(req.name) for req in core}
    assert not names & NOT_FOR_THE_LIBRARY
    assert all(not req.extras for req in core), "an extra in a core dependency (psycopg[binary]?)"
    assert PROJECT["optional-dependencies"]["tracing"] == ["opentelemetry-api>=1.20"]
    stomp = next(req for req in core if normalised(req.name) == "stomp-py")
    assert str(stomp.specifier) == "<10,>=9"


def test_the_library_imports_without_the_command_line_and_binary_packages() -> None:
    """coordinator and both participants import with click, rich and the SDK unavailable."""
    done = run_blocked(
        """
        import coordinator, coordinator.aio, participants.postgres, participants.activemq
        import participants.aio.postgres, participants.aio.activemq
        print("imported")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def test_the_command_without_its_extra_says_what_to_install() -> None:
    """``twopc`` with click missing exits 2 with one line naming the cli extra."""
    done = run_blocked("from scenarios.cli import run\nrun()\n")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "twopc: error: the twopc command needs the cli extra (click is not installed): "
        "pip install 'twopc-coordinator[cli]'"
    ]


def test_version_comes_from_the_package_metadata() -> None:
    """``coordinator.__version__`` and ``twopc --version`` say the installed version."""
    installed = version(PROJECT["name"])
    assert coordinator.__version__ == installed == PROJECT["version"]
    done = subprocess.run(
        [sys.executable, "-m", "scenarios.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == f"twopc, version {installed}"


def test_short_help_option_works_on_the_command_and_its_subcommands() -> None:
    """``-h`` prints the usage of ``twopc`` and of ``twopc log verify``."""
    for args in (["-h"], ["log", "verify", "-h"]):
        done = subprocess.run(
            [sys.executable, "-m", "scenarios.cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.startswith("Usage: "), done.stdout


def test_constraints_pin_every_dependency_the_project_names() -> None:
    """constraints.txt holds an exact version of each dependency of the core and every extra."""
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            pinned[normalised(match.group(1))] = match.group(2)
    named = list(PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        named += extra
    for spec in named:
        req = Requirement(spec)
        assert normalised(req.name) in pinned, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pinned[normalised(req.name)]), spec


def test_licence_and_changelog_ship_with_the_version() -> None:
    """LICENSE is the Apache-2.0 text and CHANGELOG.md has a section for this version."""
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert PROJECT["license"] == "Apache-2.0"
    assert f"## {PROJECT['version']}" in (ROOT / "CHANGELOG.md").read_text()
