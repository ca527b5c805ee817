"""What a story says of a worker process that stopped on its own: its last words and its run."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from scenarios.stories_peers import _last_error, _output_of

IDENT = "story-worker-test"


@pytest.fixture
def outputs() -> Iterator[None]:
    """The worker's stdout and stderr files, removed afterwards."""
    yield
    for stream in ("stdout", "stderr"):
        _output_of(IDENT, stream).unlink(missing_ok=True)


def test_a_worker_that_exited_is_explained_by_its_last_line_and_its_run(outputs: None) -> None:
    """The last stderr line and the --json run's counts and abort reasons are both quoted."""
    _output_of(IDENT, "stderr").write_text("first\ntwopc: error: the last word\n")
    run = {
        "committed": 12,
        "aborted": 88,
        "in_doubt": 0,
        "not_started": 0,
        "abort_reasons": {"insufficient funds": 88},
    }
    _output_of(IDENT, "stdout").write_text(json.dumps(run))
    why = _last_error(IDENT)
    assert why.startswith(": twopc: error: the last word (its run: 12 committed, 88 aborted")
    assert "{'insufficient funds': 88}" in why


def test_a_worker_that_printed_no_run_is_explained_by_its_last_line_only(outputs: None) -> None:
    """Without a JSON run on stdout (killed, or stopped before it), only stderr is quoted."""
    _output_of(IDENT, "stderr").write_text("")
    _output_of(IDENT, "stdout").write_text("")
    assert _last_error(IDENT) == ""
    _output_of(IDENT, "stderr").write_text("twopc: error: no broker\n")
    assert _last_error(IDENT) == ": twopc: error: no broker"
