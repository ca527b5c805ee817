"""Every relative link in README.md, CHANGELOG.md and docs/*.md resolves, and every file path
the docs name in code spans exists.

A link is ``[text](target)`` outside fenced code: its file must exist (relative to the
document), and its ``#anchor``, in the same document or another Markdown file, must be a
heading there (GitHub's anchors). A code span such as ```scenarios/wiring.py``` naming a
file under one of the repository's folders must name a file or folder that exists. A
comment pointing to a README section, ``(README: Layout)``, must name one the README has.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_design_refs import anchor, repository_files

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
#: A code span that names a path in the repository, e.g. `coordinator/aio/driver.py`.
PATH_SPAN = re.compile(r"`((?:coordinator|participants|scenarios|tests|docs|scripts)/[\w./-]*)`")
EXTERNAL = ("http://", "https://", "mailto:")
#: A comment's pointer to a README section: ``(README: Layout)``, ``(README: "Dependencies")``.
README_SECTION = re.compile(r"\(README: \"?([A-Z][\w ]*?)\"?\)")


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (their lines kept blank, for line numbers)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def shown(path: Path) -> str:
    """``path`` as the failure names it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def headings(path: Path) -> set[str]:
    """The anchors of every heading of the Markdown file ``path``."""
    return {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", prose(path.read_text()), re.M)}


def broken_links(path: Path) -> list[str]:
    """Each link of ``path`` whose file or heading does not exist, as 'file:line: target'."""
    text = prose(path.read_text())
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if target.startswith(EXTERNAL):
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{shown(path)}:{text.count(chr(10), 0, match.start()) + 1}"
        if not linked.exists():
            broken.append(f"{where}: {target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in headings(linked):
            broken.append(f"{where}: {target} (no such heading)")
    return broken


def missing_paths(path: Path) -> list[str]:
    """Each repository path named in a code span of ``path`` that does not exist."""
    text = path.read_text()
    return [
        f"{shown(path)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(1)}"
        for m in PATH_SPAN.finditer(text)
        if not (ROOT / m.group(1).rstrip("/")).exists()
    ]


def test_every_relative_link_resolves() -> None:
    """Every relative link of the README, the changelog and docs/ finds its file and heading."""
    broken = [problem for doc in DOCS for problem in broken_links(doc)]
    assert not broken, broken


def test_every_named_repository_path_exists() -> None:
    """Every repository path the README, the changelog and docs/ name in code spans exists."""
    missing = [problem for doc in DOCS for problem in missing_paths(doc)]
    assert not missing, missing


def test_every_pointer_to_a_readme_section_names_one() -> None:
    """A source, setting or script that says '(README: Section)' names a heading the README has."""
    sections = headings(ROOT / "README.md")
    pointers = [
        (shown(path), m.group(1))
        for path in repository_files()
        if path != Path(__file__).resolve()
        for m in README_SECTION.finditer(path.read_text(errors="replace"))
    ]
    assert pointers, "pyproject.toml and scripts/setup.sh point to README sections"
    assert not [p for p in pointers if anchor(p[1]) not in sections], (pointers, sections)


def test_the_check_sees_a_dangling_link_and_path(tmp_path: Path) -> None:
    """A link to a missing file or heading, and a code span naming a missing file, are found."""
    (tmp_path / "other.md").write_text("# Other\n\n## 1. A section\n")
    probe = tmp_path / "probe.md"
    probe.write_text(
        "# Title\n\n[ok](#title) [gone](#nowhere) [file](no-such.md) [other](other.md#1-x)\n"
        "[fine](other.md#1-a-section)\n```\n[in code](not-checked.md)\n```\n"
        "`tests/no_such_test.py` `docs/api.md` `scenarios/lab/`\n"
    )
    found = [line.split(": ", 1)[1] for line in broken_links(probe) + missing_paths(probe)]
    assert found == [
        "#nowhere (no such heading)",
        "no-such.md (no such file)",
        "other.md#1-x (no such heading)",
        "tests/no_such_test.py",
    ]
