"""``twopc doctor``'s check of the state folder (``TWOPC_HOME``): it holds the decision log
and the lab's secrets, so it must be this user's and writable by nobody else."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from scenarios.doctor.check import Check, finding, ok


def state_folder_check(path: Path, mode: int | None, owner: int | None, uid: int) -> Check:
    """TWOPC_HOME: owned by this user, writable by nobody else (``mode`` None: missing)."""
    name = "state folder"
    if mode is None:
        return finding(
            name,
            f"TWOPC_HOME={path} does not exist",
            f"create it for this user only: mkdir -p -m 700 {path} (or set TWOPC_HOME)",
        )
    shown = f"TWOPC_HOME={path} (mode {stat.S_IMODE(mode):04o}, owner uid {owner})"
    if not stat.S_ISDIR(mode):
        return finding(name, f"{shown} is not a folder", "set TWOPC_HOME to a folder")
    if mode & stat.S_ISVTX and mode & stat.S_IWOTH:  # /tmp and its like: not ours to chmod
        return finding(
            name,
            f"{shown} is a shared folder every user can create files in: another user "
            "could put a decision log or lock there first",
            "set TWOPC_HOME to a private folder of this user, e.g. "
            f"mkdir -p -m 700 {path / 'twopc'} && export TWOPC_HOME={path / 'twopc'}",
        )
    if owner != uid:
        return finding(
            name,
            f"{shown} belongs to another user than this one (uid {uid}): another user could "
            "replace the decision log",
            f"chown {uid} {path}, or set TWOPC_HOME to a folder of your own",
        )
    if mode & (stat.S_IWOTH | stat.S_IWGRP):
        return finding(
            name,
            f"{shown} is writable by other users: they could replace the decision log",
            f"chmod go-w {path} (0700, as 'twopc lab up' makes it)",
        )
    return ok(name, f"{shown}: this user's, writable by nobody else")


def state_folder_checks(home: Path) -> list[Check]:
    """The check of ``home`` as it is on disk."""
    try:
        info = home.stat()
    except FileNotFoundError:
        return [state_folder_check(home, None, None, os.geteuid())]
    return [state_folder_check(home, info.st_mode, info.st_uid, os.geteuid())]
