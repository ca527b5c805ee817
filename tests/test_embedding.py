"""twopc inside someone else's application: public API, typing, logging left alone, docs/api.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from scenarios.config import Settings
from tests.conftest import open_stomp_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "embed.py"

#: Prints the process's logging set-up: structlog's and stdlib's, incl. stomp.py's logger.
SNAPSHOT = textwrap.dedent(
    """
    import logging, structlog
    def snapshot():
        root = logging.getLogger()
        stomp = logging.getLogger("stomp.py")
        return (repr(structlog.get_config()), root.level, list(root.handlers),
                stomp.level, list(stomp.handlers), stomp.propagate)
    """
)


def test_importing_the_library_changes_no_logging_configuration() -> None:
    """Importing every module of coordinator/ and participants/ leaves logging as it was."""
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in ("coordinator", "participants")
        for path in (ROOT / package).rglob("*.py")
    )
    program = SNAPSHOT + textwrap.dedent(
        f"""
        import importlib
        before = snapshot()
        for name in {modules!r}:
            importlib.import_module(name)
        after = snapshot()
        assert before == after, (before, after)
        print("unchanged", len({modules!r}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("unchanged")


def test_public_api_is_exported_from_the_package() -> None:
    """coordinator/__init__ exports the coordinator, outcomes, errors and protocol types."""
    import coordinator

    for name in (
        "Coordinator",
        "Outcome",
        "TransactionAborted",
        "TransactionInDoubt",
        "XAResource",
        "XABranch",
        "LastResource",
        "LastResourceSession",
        "FileDecisionLog",
    ):
        assert name in coordinator.__all__ and hasattr(coordinator, name), name
    assert (ROOT / "coordinator" / "py.typed").exists()
    assert (ROOT / "participants" / "py.typed").exists()


@pytest.mark.slow
def test_example_passes_mypy_strict() -> None:
    """The embedding example type-checks under mypy --strict against the installed packages."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(EXAMPLE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_api_doc_shows_the_example_as_it_runs() -> None:
    """docs/api.md's 'Embedding in an application' holds the example file verbatim."""
    guide = (ROOT / "docs" / "api.md").read_text()
    section = guide.split("\n## Embedding in an application\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert EXAMPLE.read_text() in blocks


@pytest.mark.lab
def test_example_commits_atomically_on_the_lab(settings: Settings, tmp_path: Path) -> None:
    """The example commits its rows in both databases and its message, and keeps its logging."""
    env = {**os.environ, **settings.as_env()}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.fullmatch(r"order ([0-9a-f]{32}): committed as (shop\.[0-9a-f]+)\n", done.stdout)
    assert match, done.stdout
    order = match.group(1)
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT amount FROM shop_ledger WHERE id = %s", (order,)).fetchone()
        assert row is not None
    with open_stomp_client(settings.stomp) as client:
        messages = client.browse("/queue/shop.orders", idle_timeout=5.0)
    assert [m.headers.get("order-id") for m in messages].count(order) == 1
    assert (tmp_path / "shop-decisions.log").exists()
