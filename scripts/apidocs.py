"""Build the library's API reference from its docstrings with pdoc.

Every module of the library's packages, ``coordinator``, ``participants`` and ``outbox``,
gets a page (pdoc's own walk follows a package's ``__all__`` and would leave most
of ``coordinator``'s modules out). The docstrings are reStructuredText. ``make apidocs`` runs this
into ``build/apidocs/``; ``tests/test_apidocs.py`` builds into a temporary folder
and fails on a warning (a module that does not import, a docstring pdoc cannot
render) or a page missing.

    python scripts/apidocs.py [OUTPUT_FOLDER [PACKAGE...]]
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import pdoc.doc
import pdoc.render

#: The library's public packages (``scenarios`` is the tool's, and is left out).
PACKAGES = ("coordinator", "participants", "outbox")
ROOT = Path(__file__).resolve().parent.parent


def modules(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every module of ``packages`` (the library's), by name."""
    found = []
    for name in packages:
        package = importlib.import_module(name)
        found.append(name)
        found += [info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}.")]
    return sorted(found)


def build(output: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Write the HTML pages of every module of ``packages`` into ``output``, with the index
    and the search index; return the modules' names. A module that does not import raises."""
    pdoc.render.configure(docformat="restructuredtext", search=True)
    documented = {name: pdoc.doc.Module.from_name(name) for name in modules(packages)}
    for name, module in documented.items():
        target = page(output, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(pdoc.render.html_module(module, documented))
    (output / "index.html").write_text(pdoc.render.html_index(documented))
    (output / "search.js").write_text(pdoc.render.search_index(documented))
    return list(documented)


def page(output: Path, module: str) -> Path:
    """Where pdoc writes the page of ``module``."""
    return output.joinpath(*module.split(".")).with_suffix(".html")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "apidocs")
    built = build(target, tuple(sys.argv[2:]) or PACKAGES)
    print(f"{len(built)} modules: {target / 'index.html'}")
