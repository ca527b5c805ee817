"""An import-linter contract type: no module imports itself through others.

import-linter's ``acyclic_siblings`` finds cycles between sibling packages and
modules; a package's ``__init__`` importing its child while the child imports
the package is no sibling cycle, and this contract finds it too. Every import
counts, those inside a function included. Named in pyproject.toml
(``[tool.importlinter] contract_types``), run by ``lint-imports``.
"""

from __future__ import annotations

from typing import Any

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def module_cycles(graph: grimp.ImportGraph, containers: set[str]) -> list[list[str]]:
    """Each set of modules under ``containers`` that import one another in a circle, sorted."""
    modules = sorted(
        m for m in graph.modules if any(m == c or m.startswith(c + ".") for c in containers)
    )
    inside = set(modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & inside) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's strongly connected components, iteratively
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return sorted(found)


class AcyclicModulesContract(Contract):
    """No module under ``containers`` reaches itself by following imports."""

    type_name = "acyclic_modules"

    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        cycles = module_cycles(graph, set(self.containers))  # type: ignore[arg-type]
        imports: list[list[str]] = []
        for cycle in cycles:
            members = set(cycle)
            lines = []
            for importer in cycle:
                for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
                    for detail in graph.get_import_details(importer=importer, imported=imported):
                        lines.append(
                            f"{importer} -> {imported} (l.{detail['line_number']}: "
                            f"{detail['line_contents']})"
                        )
            imports.append(lines)
        return ContractCheck(kept=not cycles, metadata={"cycles": cycles, "imports": imports})

    def render_broken_contract(self, check: ContractCheck) -> None:
        metadata: dict[str, Any] = check.metadata
        for cycle, lines in zip(metadata["cycles"], metadata["imports"], strict=True):
            output.print_error(f"These modules import one another: {', '.join(cycle)}")
            for line in lines:
                output.indent_cursor()
                output.print_error(line, bold=False)
            output.new_line()
