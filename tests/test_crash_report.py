"""The crash report ``make test`` prints when a C extension kills the test run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from scripts.crash_report import report

CRASHING = textwrap.dedent(
    """
    import faulthandler, sys, threading
    crash = open(sys.argv[1], "w")
    faulthandler.enable(file=crash, all_threads=True)
    crash.write("running tests/test_a.py::test_fine\\n")
    crash.write("running tests/test_b.py::test_that_aborts\\n")
    crash.flush()
    def deep_in_a_worker():
        faulthandler._sigabrt()
    worker = threading.Thread(target=deep_in_a_worker, name="worker")
    worker.start()
    worker.join()
    """
)


def test_an_abort_in_a_thread_is_reported_with_the_test_and_the_thread(tmp_path: Path) -> None:
    """A process aborted in a thread: the report names the running test, the error, that thread."""
    crash_file = tmp_path / "crash.txt"
    done = subprocess.run(
        [sys.executable, "-c", CRASHING, str(crash_file)], capture_output=True, check=False
    )
    assert done.returncode != 0
    lines = report(crash_file.read_text())
    assert lines[1] == "running tests/test_b.py::test_that_aborts"
    assert lines[2].startswith("Fatal Python error: Aborted")
    assert lines[3].startswith("Current thread")
    assert any("deep_in_a_worker" in line for line in lines[4:])
    assert not any("Thread 0x" in line for line in lines)  # the other threads left out


def test_a_run_without_a_fatal_error_reports_nothing() -> None:
    """Only the test ids, no fatal error: nothing is printed."""
    assert report("running tests/test_a.py::test_fine\nrunning tests/test_b.py::test_b\n") == []
