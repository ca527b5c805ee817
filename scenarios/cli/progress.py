"""Progress on stderr, drawn only when stderr is a terminal (stdout stays clean for ``--json``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)


def stderr_console() -> Console:
    """A console on stderr (rich decides whether it is a terminal)."""
    return Console(stderr=True)


def progress_bars(*columns: ProgressColumn | str, transient: bool = False) -> Progress:
    """Bars on stderr, disabled (nothing drawn) unless stderr is a terminal."""
    console = stderr_console()
    shown = columns or (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*shown, console=console, transient=transient, disable=not console.is_terminal)


@contextmanager
def working(description: str) -> Iterator[None]:
    """A spinner with the elapsed time for work of unknown length (on a terminal only)."""
    with progress_bars(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True
    ) as progress:
        progress.add_task(description, total=None)
        yield
