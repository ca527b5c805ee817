"""``python -m scenarios.cli``: the ``twopc`` command."""

from scenarios.cli.main import main

main()
