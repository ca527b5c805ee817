"""The report's further parts: measurements that ``twopc bench NAME`` runs alone and
``twopc bench strategies`` adds to the comparison report as sections of their own.

A part is a module of scenarios.bench with two functions:

``run(settings, *, quick) -> dict``
    Measure on the lab (or what the settings point at); the result is JSON-able.
    ``quick`` is the short run of ``--quick``.
``sections(result) -> list[Section]``
    The result as report sections (scenarios.bench.section.Section).

:data:`PARTS` lists them in the order the report shows them. The module is imported
only when its part runs, so a part's own dependencies cost nothing elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from coordinator.errors import ConfigurationError

if TYPE_CHECKING:
    from scenarios.bench.section import Section
    from scenarios.config import Settings


@dataclass(frozen=True)
class Part:
    """One measurement: its subcommand name, its help line and the module that runs it."""

    name: str  # 'twopc bench NAME', and its key in the report's data.json
    help: str
    module: str  # scenarios.bench.<module>

    def load(self) -> ModuleType:
        return importlib.import_module(f"scenarios.bench.{self.module}")

    def run(self, settings: Settings, *, quick: bool) -> dict[str, Any]:
        run: Callable[..., dict[str, Any]] = self.load().run
        return run(settings, quick=quick)

    def sections(self, result: Mapping[str, Any]) -> list[Section]:
        sections: Callable[[Mapping[str, Any]], list[Section]] = self.load().sections
        return sections(result)


#: The parts, in report order.
PARTS: tuple[Part, ...] = (
    Part(
        "ordering",
        "Per-account order of credits: one consumer, competing consumers, message groups, CDC.",
        "ordering",
    ),
    Part(
        "flow-control",
        "The push model: producer send latency with a fast and a slow consumer.",
        "flow_control",
    ),
    Part("threads", "A new thread per task, a fixed pool and asyncio tasks.", "threads"),
    Part("polling", "The outbox relay's polling interval: B's lag against A's load.", "polling"),
    Part("fanout", "The fan-out: the credit command's receiver and the event consumers.", "fanout"),
    Part(
        "outbox-size",
        "The outbox table's size under a long run, with and without clean-up.",
        "outbox_size",
    ),
)


def part(name: str) -> Part:
    """The part called ``name``; ConfigurationError naming the known ones otherwise."""
    for p in PARTS:
        if p.name == name:
            return p
    known = ", ".join(p.name for p in PARTS) or "none"
    raise ConfigurationError(f"unknown bench part {name!r}; one of: {known}")


def names(parts: Sequence[Part] = PARTS) -> tuple[str, ...]:
    return tuple(p.name for p in parts)
