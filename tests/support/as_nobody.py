"""Run a command as user nobody, though the interpreter or this checkout lives where nobody may not go.

The project's interpreter is often under /root (pyenv), which is mode 0700.
Rather than copy it (a gigabyte) or open /root up, the command runs in a
private mount namespace where each directory nobody cannot search is covered
by a view of it that holds only what the command needs (the interpreter's
tree, the virtual environment, the checkout), each bound from the real one.
Nothing changes outside that namespace, and it ends with the command.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence

NOBODY = 65534  # uid and gid (nogroup)
CHECKOUT = pathlib.Path(__file__).resolve().parents[2]


def _searchable(directory: pathlib.Path, uid: int, gid: int) -> bool:
    info = directory.stat()
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def first_closed_directory(path: pathlib.Path, uid: int = NOBODY, gid: int = NOBODY) -> pathlib.Path | None:
    """The first directory on the way to ``path`` that ``uid`` may not search, if any."""
    for directory in reversed(path.parents):
        if not _searchable(directory, uid, gid):
            return directory
    return None


def needed_paths() -> list[pathlib.Path]:
    """What a Python command of this project reads: the interpreter's tree, the venv, the checkout."""
    found = {pathlib.Path(p).resolve() for p in (sys.base_prefix, sys.prefix, CHECKOUT)}
    return sorted(p for p in found if not any(other != p and other in p.parents for other in found))


def view_mounts(views: pathlib.Path) -> list[list[str]]:
    """The mount commands that cover each closed directory with a view holding only the needed paths
    under it; the views' directories are made (mode 0755) under ``views``."""
    binds: list[list[str]] = []
    covers: dict[pathlib.Path, pathlib.Path] = {}  # closed directory -> its view
    for path in needed_paths():
        closed = first_closed_directory(path)
        if closed is None:
            continue
        view = covers.setdefault(closed, views / str(len(covers)))
        inside = view / path.relative_to(closed)
        inside.mkdir(parents=True)
        for directory in (inside, *inside.parents):
            directory.chmod(0o755)
            if directory == view:
                break
        binds.append(["mount", "--bind", str(path), str(inside)])
    # Every path is bound into its view before the views (with those binds: --rbind) hide the real directories.
    return binds + [["mount", "--rbind", str(view), str(closed)] for closed, view in covers.items()]


def run_as_nobody(argv: Sequence[str], workdir: pathlib.Path, timeout: float) -> subprocess.CompletedProcess:
    """``argv`` as uid and gid nobody, no groups, no capabilities, in ``workdir`` (which nobody must own:
    HOME and TMPDIR point there too); output captured as text."""
    with tempfile.TemporaryDirectory(prefix="vmctl-views-") as views:
        steps = [*view_mounts(pathlib.Path(views)), ["exec", "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                                      "--clear-groups", "--", *argv]]  # fmt: skip
        script = " && ".join(shlex.join(step) for step in steps)
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            cwd=workdir,
            env=dict(os.environ, HOME=str(workdir), TMPDIR=str(workdir)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
