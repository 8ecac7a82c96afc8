"""Throwaway cgroup v2 groups for tests, removed even when the test fails.

The cgroup v2 hierarchy is wherever it is mounted: /sys/fs/cgroup on a pure
v2 host, /sys/fs/cgroup/unified on a hybrid one. The path a process shows in
/proc/PID/cgroup ("0::/name") is relative to that mount.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

from .waiting import wait_for


def _mount_point() -> pathlib.Path | None:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, where, kind, *_ = line.split()
            if kind == "cgroup2":
                return pathlib.Path(where)
    return None


CGROUP2 = _mount_point()


@contextlib.contextmanager
def cgroup(name: str) -> Iterator[pathlib.Path]:
    """A new cgroup ``/name``; at exit, members still alive move back to the
    root and the group is removed (after the last exited member is reaped)."""
    if CGROUP2 is None:
        raise RuntimeError("no cgroup v2 hierarchy is mounted")
    path = CGROUP2 / name
    path.mkdir()
    try:
        yield path
    finally:
        wait_for(lambda: _emptied_and_removed(path), f"cgroup {path} to be removed")


def _emptied_and_removed(path: pathlib.Path) -> bool:
    """Move the group's members back to the root and remove it; False while a member is still on its way out."""
    assert CGROUP2 is not None
    for pid in (path / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):  # exited meanwhile
            (CGROUP2 / "cgroup.procs").write_text(pid)
    try:
        path.rmdir()
    except OSError:  # EBUSY
        return False
    return True
