"""A pipeline's child that does not stop on SIGTERM is killed once it has written its
threads' stacks to its log, and the pipeline says which child and where the stacks are."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from structlog.testing import capture_logs

from scenarios import events as ev
from scenarios.config import Settings
from scenarios.outbox.pipeline import Pipeline
from tests.cli_process import stop_report

#: A child that ignores SIGTERM, answers SIGUSR1 with its stacks (as every twopc service
#: does, scenarios.stopping) and sleeps in a function named to be found in them.
STUCK = """
import faulthandler, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
def stuck_in_here():
    print("ready", flush=True)
    time.sleep(120)
stuck_in_here()
"""


#: A child that ends on SIGTERM (Python's default action).
ENDS = "import time; time.sleep(120)"


@dataclass
class ScriptPipeline(Pipeline):
    """A batch pipeline (one child) whose child runs ``script``."""

    script: str = STUCK

    def command(self, kind: str, index: int = 0) -> list[str]:
        return [sys.executable, "-c", self.script]


def test_a_child_that_ignores_sigterm_is_killed_after_writing_its_stacks(
    tmp_path: Path,
) -> None:
    """stop(): the stuck child is killed (-9), its log holds its stack, and the pipeline
    names it in ``stuck`` and in a pipeline.worker.killed warning."""
    settings = Settings(tmp_path, "postgresql://a", "postgresql://b", "127.0.0.1:1", "")
    pipeline = ScriptPipeline(settings, "batch", processes=True, log_dir=str(tmp_path)).start()
    log = tmp_path / "batch-0.log"
    deadline = time.monotonic() + 30
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    with capture_logs() as logs:
        codes = pipeline.stop(timeout=0.5)
    assert codes == [-signal.SIGKILL]
    assert list(pipeline.stuck) == ["batch-0"]
    assert "had not stopped 0.5 s after SIGTERM" in pipeline.stuck["batch-0"]
    assert str(log) in pipeline.stuck["batch-0"]
    assert "stuck_in_here" in log.read_text(), "no stack was written before the kill"
    assert "stuck_in_here" in stop_report(pipeline)
    killed = [e for e in logs if e["event"] == ev.PIPELINE_WORKER_KILLED]
    assert [(e["worker"], e["log_level"]) for e in killed] == [("batch-0", "warning")]


def test_a_clean_stop_reports_nothing_stuck(tmp_path: Path) -> None:
    """A child that ends on SIGTERM: its own exit code, nothing in ``stuck``."""

    settings = Settings(tmp_path, "postgresql://a", "postgresql://b", "127.0.0.1:1", "")
    pipeline = ScriptPipeline(
        settings, "batch", processes=True, log_dir=str(tmp_path), script=ENDS
    ).start()
    assert pipeline.stop(timeout=10) == [-signal.SIGTERM]
    assert pipeline.stuck == {}
    assert stop_report(pipeline) == ""
