"""``twopc log dump | verify | truncate``: the decision log from the outside, without a coordinator.

``dump`` and ``verify`` read the file without its lock (a running coordinator
is not disturbed); ``truncate`` is the documented repair of a log damaged in
the middle, and takes the lock.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from coordinator.log import format as fmt
from coordinator.log.file import read_entries, truncate_at
from scenarios.config import LOG_FILE, home_dir

console = Console()


def _log_path() -> Path:
    """The decision log in the state folder: no connection setting is needed to read it."""
    return home_dir() / LOG_FILE


def _describe(entry: fmt.Entry) -> dict[str, Any]:
    record = entry.record
    described: dict[str, Any] = {"offset": entry.offset, "bytes": entry.size}
    if isinstance(record, fmt.Commit):
        described.update(type="COMMIT", gtrid=record.gtrid, participants=list(record.participants))
    elif isinstance(record, fmt.End):
        described.update(type="END", gtrid=record.gtrid)
    elif isinstance(record, fmt.Checkpoint):
        described.update(type="CHECKPOINT", pending=[c.gtrid for c in record.pending])
    else:
        described.update(type="DAMAGED", problem=entry.problem)
    return described


def _entries() -> tuple[Any, list[fmt.Entry]]:
    path = _log_path()
    try:
        return path, read_entries(path)
    except FileNotFoundError:
        raise click.ClickException(f"no decision log at {path} (TWOPC_HOME)") from None


def _print(entries: list[dict[str, Any]]) -> None:
    table = Table()
    for column in ("offset", "bytes", "type", "gtrid / problem", "participants / pending"):
        table.add_column(column)
    for e in entries:
        detail = e.get("gtrid") or e.get("problem") or ""
        extra = e.get("participants") or e.get("pending") or []
        table.add_row(str(e["offset"]), str(e["bytes"]), e["type"], detail, ", ".join(extra))
    console.print(table)


@click.group("log")
def log() -> None:
    """The decision log: dump its records, verify it, repair it."""


@log.command("dump")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def dump(as_json: bool) -> None:
    """Every record with its byte offset, and every damaged stretch (no lock taken)."""
    path, entries = _entries()
    described = [_describe(e) for e in entries]
    if as_json:
        click.echo(json.dumps({"path": str(path), "entries": described}, indent=2))
    else:
        console.print(f"decision log {path}")
        _print(described)


@log.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify(as_json: bool) -> None:
    """Check every record's frame and CRC; exit 1 at damage a coordinator would refuse."""
    path, entries = _entries()
    damaged = [e for e in entries if e.problem is not None]
    pending = fmt.replay(e.record for e in entries if e.record is not None)
    verdict: dict[str, Any] = {
        "path": str(path),
        "records": len(entries) - len(damaged),
        "pending": len(pending),
        "state": "intact",
        "damaged_at": None,
        "problem": None,
    }
    if damaged:
        first = damaged[0]
        torn = first is entries[-1] and "torn tail" in (first.problem or "")
        verdict.update(
            state="torn tail" if torn else "damaged", damaged_at=first.offset, problem=first.problem
        )
    if as_json:
        click.echo(json.dumps(verdict, indent=2))
    elif verdict["state"] == "intact":
        click.echo(f"{path}: {len(entries)} records, all intact; {len(pending)} COMMIT without END")
    elif verdict["state"] == "torn tail":
        click.echo(
            f"{path}: {len(entries) - 1} records intact, then a torn tail at byte offset "
            f"{verdict['damaged_at']} ({verdict['problem']}); the next open truncates it"
        )
    else:
        click.echo(
            f"twopc: error: {path}: damaged at byte offset {verdict['damaged_at']}: "
            f"{verdict['problem']}. "
            f"'twopc log dump' shows the records after it; once you know what they decided, "
            f"'twopc log truncate --at {verdict['damaged_at']} --i-know' cuts the log there.",
            err=True,
        )
    if verdict["state"] == "damaged":
        sys.exit(1)


@log.command("truncate")
@click.option(
    "--at",
    "offset",
    type=click.IntRange(min=0),
    required=True,
    help="Byte offset to cut the log at.",
)
@click.option("--i-know", is_flag=True, help="Confirm: the records from OFFSET on are dropped.")
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) dropped.")
def truncate(offset: int, i_know: bool, as_json: bool) -> None:
    """Cut the log at OFFSET (a record's start), dropping every record from there on."""
    path, entries = _entries()
    dropped = [_describe(e) for e in entries if e.offset >= offset]
    if not i_know:
        if as_json:
            click.echo(json.dumps({"path": str(path), "at": offset, "would_drop": dropped}))
        else:
            click.echo(f"would drop {len(dropped)} entries of {path} from byte offset {offset}:")
            _print(dropped)
        raise click.UsageError("add --i-know to cut the log; keep a copy of the file first")
    cut = truncate_at(path, offset)
    if as_json:
        dropped = [_describe(e) for e in cut]
        click.echo(json.dumps({"path": str(path), "at": offset, "dropped": dropped}, indent=2))
        return
    click.echo(f"{path}: cut at byte offset {offset}; {len(cut)} entries dropped")
