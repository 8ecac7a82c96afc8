"""A memory limit from the cgroup v1 memory controller, for a real source of memory pressure.

On hosts where the memory controller is bound to a v1 hierarchy (as on these
machines: /sys/fs/cgroup/memory), cgroup v2 groups have no memory controller
of their own, yet PSI still counts their tasks' memory stalls. A process
held to a small v1 limit and made to touch more than it (with swap) stalls
in reclaim, and its v2 cgroup's memory.pressure shows it.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

from .waiting import wait_for

MEMCG_V1 = pathlib.Path("/sys/fs/cgroup/memory")


def available() -> bool:
    return (MEMCG_V1 / "memory.limit_in_bytes").exists()


@contextlib.contextmanager
def memory_limit(name: str, limit: int) -> Iterator[pathlib.Path]:
    """A v1 memory cgroup ``/name`` limited to ``limit`` bytes; at exit its
    members still alive move back to the v1 root and it is removed."""
    path = MEMCG_V1 / name
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        yield path
    finally:
        wait_for(lambda: _emptied_and_removed(path), f"memory cgroup {path} to be removed")


def _emptied_and_removed(path: pathlib.Path) -> bool:
    for pid in (path / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):  # exited meanwhile
            (MEMCG_V1 / "cgroup.procs").write_text(pid)
    try:
        path.rmdir()
    except OSError:  # EBUSY: a member on its way out
        return False
    return True
