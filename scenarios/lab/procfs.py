"""Reading /proc: the live pids, a process's stat fields and the CPUs' busy time (Linux only)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")
#: Clock ticks per second: the unit of /proc/stat and of a process's utime and stime.
TICKS = os.sysconf("SC_CLK_TCK")


def pids() -> Iterator[int]:
    """Every pid listed in /proc at this moment (some may be gone by the time they are read)."""
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, None if the process is gone.

    The command name may hold spaces and parentheses, so the line is split
    after its last ')': index 0 is the state (field 3 of proc(5)), 1 the ppid,
    11 and 12 utime and stime, 13 and 14 cutime and cstime, 19 the start time.
    """
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def busy_seconds() -> float:
    """CPU seconds every CPU of the machine has spent busy since boot, whoever ran.

    The first line of /proc/stat: user, nice, system, idle, iowait, irq, softirq,
    steal, ... in clock ticks; busy is everything but idle and iowait (guest time is
    counted in user already, so the guest columns are left out)."""
    with (PROC / "stat").open() as stat:
        ticks = [int(t) for t in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


def cmdline(pid: int) -> bytes | None:
    """The raw command line of ``pid`` (NUL-separated), None if the process is gone."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None


def status_numbers(pid: int | str, fields: tuple[str, ...]) -> dict[str, int]:
    """The first number of each of ``fields`` in /proc/<pid>/status (``"self"``: this
    process): kB for VmRSS and VmHWM, a count for Threads. Missing fields are left out."""
    found: dict[str, int] = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields and value.split():
            found[name] = int(value.split()[0])
    return found
