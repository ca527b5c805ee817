"""The ``twopc`` command line: click commands that parse arguments, call and print."""

from __future__ import annotations

import sys

#: What the command needs beyond the library: the ``cli`` extra.
CLI_MODULES = ("click", "rich")


def run() -> None:
    """The ``twopc`` command, or what to install when its extra is missing."""
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name not in CLI_MODULES:
            raise
        sys.stderr.write(
            f"twopc: error: the twopc command needs the cli extra ({exc.name} is not "
            "installed): pip install 'twopc-coordinator[cli]'\n"
        )
        raise SystemExit(2) from None
    from scenarios.cli.main import main

    main(prog_name="twopc")  # also under 'python -m scenarios.cli': completion's _TWOPC_COMPLETE
