"""A section of a report: a titled table, a note and optionally a plot.

scenarios.bench.report_pages renders sections alike to Markdown and HTML.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Section:
    """A titled table (and optionally a plot) of the report."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    plot: str | None = None
    text_columns: tuple[int, ...] = (0,)  # left-aligned; the other columns are figures
