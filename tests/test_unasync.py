"""The generator of the synchronous modules: current output, strict rules, a pinned formatter."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_under_test", ROOT / "scripts/unasync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def generator() -> Iterator[ModuleType]:
    yield load_generator()


def test_generated_sync_modules_are_current() -> None:
    """Every generated module is exactly what scripts/unasync.py makes from its source."""
    done = subprocess.run(
        [sys.executable, "scripts/unasync.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_modules_say_so_in_their_first_lines(generator: ModuleType) -> None:
    """Each generated file names its source in a ``# Generated from`` comment at the top."""
    for source, target in generator.FILES.items():
        head = (ROOT / target).read_text().splitlines()[:3]
        assert any(line.startswith(f"# Generated from {source}") for line in head), target


def test_a_substitution_no_source_uses_is_an_error(generator: ModuleType) -> None:
    """A rule that changes nothing in any source stops the generator, naming the rule."""
    generator.NAMES["AsyncNoSuchThing"] = "NoSuchThing"
    with pytest.raises(generator.GeneratorError, match="AsyncNoSuchThing"):
        generator.generate_all()


def test_the_shim_pairs_asyncio_names_with_their_thread_twins(generator: ModuleType) -> None:
    """coordinator/compat.py's ``asleep`` becomes ``sleep`` in a generated module."""
    assert generator.compat_names()["asleep"] == "sleep"
    rules = generator.Unasync()
    out = rules.unasync("from coordinator.compat import asleep\n\nawait asleep(1)\nx.asleep\n")
    assert out == "from coordinator.compat import sleep\n\nsleep(1)\nx.asleep\n"


def test_another_formatter_version_is_refused(
    generator: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a ruff other than the pinned one the generator refuses to run, saying what to do."""
    monkeypatch.setattr(generator, "pinned_ruff", lambda: "0.0.1")
    with pytest.raises(generator.GeneratorError, match=r"ruff 0\.0\.1 .*make setup"):
        generator.check_ruff()


def test_asyncio_only_blocks_awaited_results_and_async_with_are_unasynced(
    generator: ModuleType,
) -> None:
    """Lines between ``# unasync: asyncio only`` and ``# unasync: end`` are left out,
    ``Awaitable[X]`` becomes ``X`` and ``async with`` becomes ``with``."""
    source = (
        "async def f(g: Callable[[], Awaitable[list[int]]]) -> None:\n"
        "    async with lock:\n"
        "        await g()\n"
        "    # unasync: asyncio only\n"
        "    loop_only()\n"
        "    # unasync: end\n"
        "    done()\n"
    )
    assert generator.Unasync().unasync(source) == (
        "def f(g: Callable[[], list[int]]) -> None:\n    with lock:\n        g()\n    done()\n"
    )
