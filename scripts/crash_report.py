"""Print the fatal error a test run died of, if any (``make test`` calls it on failure).

tests/conftest.py sends faulthandler's tracebacks to build/test-crash.txt, after a
``running <test id>`` line per test. A crash in a C extension (SIGSEGV, SIGABRT)
kills pytest before its summary; this prints the test that was running, the
error, and the thread it happened in, short enough to be read at a log's end.
"""

from __future__ import annotations

import sys
from pathlib import Path

CRASH_FILE = Path(__file__).resolve().parents[1] / "build" / "test-crash.txt"
#: Lines of the crashing thread's traceback shown.
THREAD_LINES = 40


def report(text: str) -> list[str]:
    """The lines to print for the crash log ``text``; none if no fatal error is in it."""
    lines = text.splitlines()
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python")), None)
    if fatal is None:
        return []
    running = [line for line in lines[:fatal] if line.startswith("running ")]
    out = [
        "---- the test run died of a fatal error (build/test-crash.txt) ----",
        running[-1] if running else "running: no test had started",
        lines[fatal],
    ]
    current = next(
        (i for i in range(fatal, len(lines)) if lines[i].startswith("Current thread")), None
    )
    if current is not None:
        block = lines[current : current + THREAD_LINES]
        end = next((i for i, line in enumerate(block) if not line.strip()), len(block))
        out += block[:end]
    return out


def main() -> int:
    if not CRASH_FILE.exists():
        return 0
    for line in report(CRASH_FILE.read_text(errors="replace")):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
