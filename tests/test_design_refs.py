"""Citations of the design document resolve: docs/design.md's numbered sections exist.

The code cites the design as ``docs/design.md §n``. These tests read every
source and documentation file of the repository and fail on a citation of a
section that does not exist, on any citation of the old, external notes
(``DESIGN`` followed by a section sign), and on a Markdown link to a heading of
docs/design.md that is not there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN_DOC = ROOT / "docs" / "design.md"

#: Files that can cite the design: sources, docs, settings and scripts.
SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".txt", ".cfg", ".ini", ".sh"}
NAMES = {"Makefile"}
SKIPPED_DIRS = {"__pycache__", "node_modules", "build", "dist"}

#: The notes outside the repository, cited as DESIGN and a section sign (a comment or
#: docstring may wrap between the two).
OLD_NOTES = re.compile(r"\bDESIGN[\s#]*§")
#: ``design.md`` then one or more sections, e.g. ``docs/design.md §4`` or ``§3, §4``,
#: possibly wrapped onto the next line of a comment.
CITATION = re.compile(r"design\.md((?:[\s#,]*(?:and\s+)?§\s*\d+)+)")
#: A Markdown link into docs/design.md at a heading: ``(design.md#anchor)``.
ANCHOR_LINK = re.compile(r"\((?:[./\w-]*/)?design\.md#([^)\s]+)\)")
SECTION = re.compile(r"^## (\d+)\. ", re.M)


def repository_files() -> Iterator[Path]:
    """Every file of the repository that may cite the design (no hidden or build folders)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and d not in SKIPPED_DIRS and "egg-info" not in d
        )
        for name in sorted(files):
            path = Path(folder, name)
            if path.suffix in SUFFIXES or name in NAMES:
                yield path


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def old_citations(text: str) -> list[int]:
    """Line numbers of citations of the external notes in ``text``."""
    return [line_of(text, m.start()) for m in OLD_NOTES.finditer(text)]


def citations(text: str) -> list[tuple[int, int]]:
    """(line, section number) of every ``design.md §n`` citation in ``text``."""
    found = []
    for match in CITATION.finditer(text):
        for number in re.findall(r"§\s*(\d+)", match.group(1)):
            found.append((line_of(text, match.start()), int(number)))
    return found


def sections(design: str) -> list[int]:
    """The numbers of the design's ``## n. Title`` sections, in order."""
    return [int(n) for n in SECTION.findall(design)]


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to -."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def anchors(design: str) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", design, re.M)}


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_design_sections_are_numbered_one_to_n() -> None:
    """Every second-level heading of docs/design.md is numbered, 1, 2, 3... in order."""
    design = DESIGN_DOC.read_text()
    headings = re.findall(r"^## .*$", design, re.M)
    assert headings and len(headings) == len(sections(design)), headings
    assert sections(design) == list(range(1, len(headings) + 1))


def test_no_file_cites_the_external_notes() -> None:
    """No source or doc cites the notes outside the repository ('DESIGN' and a section sign)."""
    found = [
        f"{relative(path)}:{line}"
        for path in repository_files()
        for line in old_citations(path.read_text(errors="replace"))
    ]
    assert not found, f"cite docs/design.md §n instead: {found}"


def test_every_design_citation_names_an_existing_section() -> None:
    """Every 'docs/design.md §n' in a source or doc names a section docs/design.md has."""
    existing = set(sections(DESIGN_DOC.read_text()))
    cited = [
        (relative(path), line, number)
        for path in repository_files()
        for line, number in citations(path.read_text(errors="replace"))
    ]
    missing = [f"{path}:{line} cites §{n}" for path, line, n in cited if n not in existing]
    assert cited, "the code cites the design; the scan found no citation at all"
    assert not missing, f"docs/design.md has sections {sorted(existing)}: {missing}"


def test_links_to_design_headings_resolve() -> None:
    """Every Markdown link to docs/design.md#anchor names a heading the document has."""
    existing = anchors(DESIGN_DOC.read_text())
    broken = [
        f"{relative(path)}:{line_of(text, m.start())} links #{m.group(1)}"
        for path in repository_files()
        if path.suffix == ".md"
        for text in [path.read_text(errors="replace")]
        for m in ANCHOR_LINK.finditer(text)
        if m.group(1) not in existing
    ]
    assert not broken, broken


def test_scanner_finds_wrapped_and_listed_citations() -> None:
    """The scan sees citations wrapped across comment lines, lists of sections, and old ones."""
    text = (
        "# a comment citing docs/design.md\n"
        "# §12, which is wrapped\n"
        "x = 1  # see docs/design.md §3, §4\n"
        '"""(DESIGN\n    §7): the old notes, wrapped in a docstring"""\n'
    )
    assert citations(text) == [(1, 12), (3, 3), (3, 4)]
    assert old_citations(text) == [4]
    assert anchor("## 4. Fencing and liveness".lstrip("# ")) == "4-fencing-and-liveness"
