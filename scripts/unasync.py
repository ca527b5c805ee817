"""Generate the synchronous modules from their asyncio source (httpcore's unasync approach).

The commit sequence and the transaction's work API are written once, for
asyncio, in ``coordinator/aio/``; this script writes their synchronous
counterparts by dropping ``async``/``await`` and mapping asyncio names to
their thread counterparts. ``tests/test_unasync.py`` fails when a generated
file is not current. Run ``python scripts/unasync.py`` after editing a source
(``--check`` only reports).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: asyncio source -> generated synchronous module.
FILES = {
    "coordinator/aio/driver.py": "coordinator/driver.py",
    "coordinator/aio/transaction.py": "coordinator/transaction.py",
}

#: Whole-word replacements, in order.
NAMES = {
    "AsyncXABranch": "XABranch",
    "AsyncXAResource": "XAResource",
    "AsyncLastResourceSession": "LastResourceSession",
    "AsyncLastResource": "LastResource",
    "AsyncTransactionHost": "TransactionHost",
    "AsyncTransaction": "Transaction",
    "AsyncDriverConfig": "DriverConfig",
    "AsyncCursor": "Cursor",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "asyncio.sleep": "time.sleep",
}

#: Modules imported from: the asyncio one -> the synchronous one (import lines only).
MODULES = {
    "coordinator.aio.runtime": "coordinator.runtime",
    "coordinator.aio.transaction": "coordinator.transaction",
}

#: Syntax replacements (regular expressions), applied after the names.
SYNTAX = [
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"^import asyncio\n", ""),
]


def header(source: str) -> str:
    return (
        f"# Generated from {source} by scripts/unasync.py: edit that file, then run\n"
        "# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).\n"
    )


def unasync(text: str) -> str:
    """The synchronous text of an asyncio module (before formatting)."""
    for old, new in NAMES.items():
        text = re.sub(rf"(?<!\w){re.escape(old)}\b", new, text)
    for old, new in MODULES.items():
        text = re.sub(rf"^from {re.escape(old)} import", f"from {new} import", text, flags=re.M)
    for pattern, new in SYNTAX:
        text = re.sub(pattern, new, text, flags=re.MULTILINE)
    return text


def _ruff(args: list[str], text: str, filename: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--stdin-filename", filename, "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode not in (0, 1) or not done.stdout:
        raise RuntimeError(f"ruff {' '.join(args)} failed on {filename}: {done.stderr}")
    return done.stdout


def generate(source: str, target: str) -> str:
    """The generated text of ``target`` from ``source``: unasynced, imports sorted, formatted."""
    text = header(source) + unasync((ROOT / source).read_text())
    text = _ruff(["check", "--fix", "--select", "I,F401", "--quiet", "--exit-zero"], text, target)
    return _ruff(["format", "--quiet"], text, target)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for source, target in FILES.items():
        text = generate(source, target)
        path = ROOT / target
        if path.exists() and path.read_text() == text:
            continue
        stale.append(target)
        if not check:
            path.write_text(text)
    for target in stale:
        print(f"{'stale' if check else 'written'}: {target}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
