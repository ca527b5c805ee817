"""The one stop mechanism of long-running commands: who asked first, the status, the summary."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from coordinator.errors import ConfigurationError
from scenarios import stopping
from scenarios.stopping import RunStop, RunStopped, finish_run, stop_on_signals
from tests.cli_process import stopped

ROOT = Path(__file__).resolve().parent.parent


def test_the_first_request_wins_and_sets_the_status() -> None:
    """A signal then a fatal error: the signal's reason and 128 + its number stay."""
    stop = RunStop()
    assert stop.by_signal(signal.SIGTERM)
    assert not stop.fail("the decision log cannot be written")
    assert (stop.status, stop.error, stop.describe()) == (143, False, "stopped by SIGTERM")


def test_a_fatal_error_exits_1_after_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """fail(): the summary prints, then one 'twopc: error:' line, exit status 1."""
    stop = RunStop()
    stop.fail("the decision log cannot be written")
    with pytest.raises(SystemExit) as exited:
        finish_run(stop, lambda: print("the summary"))
    out, err = capsys.readouterr()
    assert exited.value.code == 1
    assert out == "the summary\n"
    assert err == "twopc: error: the decision log cannot be written\n"


def test_a_run_not_stopped_prints_its_summary_and_returns(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not stopped and no status: finish_run prints the summary and the command goes on."""
    finish_run(RunStop(), lambda: print("the summary"))
    assert capsys.readouterr().out == "the summary\n"


def test_a_checkpoint_raises_only_inside_a_stopped_run() -> None:
    """checkpoint() is silent outside stop_on_signals and before a stop; then RunStopped."""
    stopping.checkpoint()
    with stop_on_signals() as stop:
        stopping.checkpoint()
        assert not stopping.stop_requested()
        stop.by_signal(signal.SIGINT)
        assert stopping.stop_requested()
        with pytest.raises(RunStopped) as stopped:
            stopping.checkpoint()
        assert stopped.value.stop.status == 130
    assert not stopping.stop_requested()


def test_the_handlers_are_restored_after_the_block() -> None:
    """SIGTERM's and SIGINT's handlers are the previous ones again once the block ends."""
    before = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    with stop_on_signals():
        assert all(signal.getsignal(s) is not before[s] for s in stopping.STOP_SIGNALS)
    assert {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS} == before


DUMPING = """
import time
from scenarios.stopping import stop_on_signals
with stop_on_signals() as stop:
    with stop_on_signals():  # an inner block (a command run by another) has come and gone
        pass
    print("ready", flush=True)
    while not stop.is_set():
        time.sleep(0.05)
print("stopped", stop.status, flush=True)
"""


def test_sigusr1_writes_every_threads_stack_to_stderr_and_stops_nothing() -> None:
    """SIGUSR1 during a run, after an inner block has ended: every thread's stack on
    stderr; the run goes on until SIGTERM."""
    child = subprocess.Popen(
        [sys.executable, "-c", DUMPING],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        child.send_signal(stopping.DUMP_SIGNAL)
        time.sleep(0.5)
        assert child.poll() is None  # still running
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert out == "stopped 143\n"
    # Every thread: the main one in the child's own code (which line depends on when the
    # signal came, on a loaded machine), and the thread that acts on the stop signals.
    assert err.count("(most recent call first):") == 2, err
    assert 'File "<string>", line ' in err and "in _run" in err, err


def test_a_run_whose_stderr_has_no_file_still_stops_on_signals() -> None:
    """stderr replaced by a stream without a file descriptor (click's CliRunner): the block
    runs, with its stop handlers, and without the stack dump."""
    runner = CliRunner()

    @click.command()
    def command() -> None:
        with stop_on_signals() as stop:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            click.echo(f"inside, stopped: {stop.is_set()}")

    done = runner.invoke(command, [])
    assert (done.exit_code, done.output) == (0, "inside, stopped: False\n"), done.exception


HOLDING = """
import os, signal, time
from scenarios.stopping import stop_on_signals
with stop_on_signals() as stop:
    with {lock}:  # the main thread holds a lock a stop takes when the signal comes
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs here, in this thread
    stopped = stop.wait(10)
print("stopped", stopped, stop.status, flush=True)
"""


@pytest.mark.parametrize(
    "lock",
    [
        pytest.param("stop._cond", id="inside-stop.wait"),  # threading.Event's own lock
        pytest.param("stop._lock", id="inside-stop.fail"),  # RunStop.request's
    ],
)
def test_a_signal_that_comes_while_the_main_thread_holds_the_stops_lock_still_stops(
    lock: str,
) -> None:
    """SIGTERM while the main thread holds the lock that setting the stop takes: the run
    stops once it lets go (the handler takes no lock, so it cannot wait for itself)."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDING.format(lock=lock)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = stopped(child)  # hung: its stacks, then killed
    assert (child.returncode, out) == (0, "stopped True 143\n"), err
    assert "SIGTERM: finishing the work in hand" in err


CHILD = """
import sys
from scenarios.stopping import stop_on_signals
with stop_on_signals() as stop:
    stopped = stop.wait(60)
with open(sys.argv[1] + ".part", "w") as out:
    out.write(f"{stopped} {stop.status} {stop.describe()}")
import os
os.replace(sys.argv[1] + ".part", sys.argv[1])
"""

PARENT = """
import os, signal, subprocess, sys
env = dict(os.environ, TWOPC_STOP_WITH_PARENT=str(os.getpid()))
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_child_stops_as_on_sigterm_once_the_process_that_started_it_is_killed(
    tmp_path: Path,
) -> None:
    """A command started with TWOPC_STOP_WITH_PARENT (as a pipeline starts its relays and
    consumers) stops, as on SIGTERM, once that process is gone, even killed with SIGKILL."""
    said = tmp_path / "child.txt"
    parent = subprocess.run([sys.executable, "-c", PARENT, CHILD, str(said)], cwd=ROOT, check=False)
    assert parent.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while not said.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped, status, why = said.read_text().split(" ", 2)
    assert (stopped, status) == ("True", "143"), why
    assert why.startswith("stopped by the end of its parent process "), why


def test_a_parent_that_is_not_a_pid_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """TWOPC_STOP_WITH_PARENT set to anything but a pid: a clear error naming it."""
    monkeypatch.setenv(stopping.STOP_WITH_PARENT, "1; rm -rf /")
    stopping._parent_to_follow.cache_clear()  # read again, as in a new process
    before = signal.getsignal(signal.SIGTERM)
    try:
        with (
            pytest.raises(
                ConfigurationError, match=r"TWOPC_STOP_WITH_PARENT=.* is not a process id"
            ),
            stop_on_signals(),
        ):
            pass
    finally:
        stopping._parent_to_follow.cache_clear()
    assert signal.getsignal(signal.SIGTERM) is before  # refused before any handler changed
