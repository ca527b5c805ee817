"""The unprivileged account the lab's services run as when twopc runs as root."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from scenarios.lab.errors import LabError

LAB_USER = "twopc-lab"  # the unprivileged user the services run as when twopc runs as root


def lab_user() -> pwd.struct_passwd | None:
    """None when not root; else the unprivileged user the clusters run as."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(LAB_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",  # its own group: the one the state folder lets through
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                LAB_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(LAB_USER)


def check_reachable(user: pwd.struct_passwd, path: Path) -> None:
    """LabError unless ``user`` may traverse ``path`` (the clusters' folders, when root)."""
    probe = subprocess.run(
        ["test", "-x", str(path)], user=user.pw_uid, group=user.pw_gid, check=False
    )
    if probe.returncode != 0:
        raise LabError(
            f"PostgreSQL refuses to run as root, so the lab runs it as '{LAB_USER}', "
            f"who cannot reach {path}. Set TWOPC_HOME to a folder every user can "
            "traverse (e.g. /var/tmp/twopc) or make its parents world-executable."
        )


def chown_tree(root: Path, user: pwd.struct_passwd) -> None:
    """Give ``root`` and everything under it to ``user`` (what is theirs already is skipped)."""
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        if (info.st_uid, info.st_gid) != (user.pw_uid, user.pw_gid):
            os.lchown(path, user.pw_uid, user.pw_gid)
