"""The real ``twopc`` CLI in a child process that a test signals while it runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psycopg

from scenarios.outbox.pipeline import Pipeline

TWOPC = [sys.executable, "-m", "scenarios.cli"]

#: Children started and not yet reaped: reap_children() ends them after each test.
_LIVE: list[Running] = []


class Running:
    """A ``twopc`` child whose stdout and stderr go to files the test reads while it runs."""

    def __init__(self, env: dict[str, str], folder: Path, *args: str) -> None:
        self.out_path = folder / "stdout"
        self.err_path = folder / "stderr"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen([*TWOPC, *args], stdout=out, stderr=err, env=env)
        _LIVE.append(self)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll ``condition`` until it holds; fail naming ``what`` if the child ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"twopc ended ({self.process.returncode}) before {what}:\n"
                    f"{self.stdout}\n{self.stderr}"
                )
            if time.monotonic() > deadline:
                self.reap()
                raise AssertionError(f"no {what} within {timeout} s:\n{self.stderr}")
            time.sleep(0.05)

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = 120.0) -> int:
        """The exit status, once the child ended."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.reap()
            raise

    def reap(self) -> None:
        """SIGKILL the child if it still runs, and wait for its end (no zombie, no warning)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self in _LIVE:
            _LIVE.remove(self)


def stopped(process: subprocess.Popen[Any], timeout: float = 30.0) -> tuple[Any, Any]:
    """The stdout and stderr of a child told to stop, once it has ended. One that has not
    within ``timeout`` is asked for its threads' stacks (SIGUSR1: scenarios/stopping.py),
    then killed, so that the tests after it do not meet it; the failure shows the stacks."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        process.kill()
        err = process.communicate()[1]
        text = err.decode(errors="replace") if isinstance(err, bytes) else err
        raise AssertionError(
            f"{process.args} did not stop within {timeout} s of being told to; its stderr, "
            f"with every thread's stack:\n{text}"
        ) from None


def all_stopped(processes: Iterable[subprocess.Popen[Any]]) -> None:
    """:func:`stopped` for each child told to stop: every one has ended (killed if it had
    to be) before the failure of any is raised, with the stacks of each that had not."""
    failures = []
    for process in processes:
        try:
            stopped(process)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("\n\n".join(failures))


def stop_report(pipeline: Pipeline, lines: int = 80) -> str:
    """Why the pipeline's last stop was not clean: each child it had to kill, with the end
    of its log (the threads' stacks it wrote before SIGKILL); empty if it killed none."""
    parts = []
    for name, line in pipeline.stuck.items():
        parts.append(line)
        log = pipeline.log_path(name)
        if log and Path(log).exists():
            tail = Path(log).read_text(errors="replace").splitlines()[-lines:]
            parts.append("\n".join(tail))
    return "\n".join(parts)


def reap_children() -> None:
    """End and reap every child a test started and left running (a failed test's)."""
    while _LIVE:
        _LIVE[0].reap()


def count_rows(dsn: str, query: str) -> int:
    """The one integer ``query`` returns on ``dsn``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def prepared_left(*dsns: str) -> int:
    """Prepared transactions on every one of ``dsns`` (pg_prepared_xacts)."""
    return sum(count_rows(dsn, "SELECT count(*) FROM pg_prepared_xacts") for dsn in dsns)


def lock_waiters(dsn: str) -> int:
    """Sessions of ``dsn``'s server waiting for a row lock."""
    return count_rows(dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
