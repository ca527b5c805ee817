"""``python -m scenarios.cli``: the ``twopc`` command."""

from scenarios.cli import run

run()
