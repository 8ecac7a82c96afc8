"""Cgroup v2 paths as the node names them, wherever the agent runs.

The kernel writes the ``0::`` line of /proc/PID/cgroup relative to the root
of the READER's cgroup namespace. On a plain host the agent shares the
initial namespace and reads absolute paths. In a container with a private
cgroup namespace (containerd's default on cgroup v2) the root is the
container's own cgroup, so another pod's process reads
``/../../kubepods-burstable.slice/...``, and policy prefixes such as
``/kubepods`` would match nothing.

The reference is pid 1's cgroup namespace (with ``hostPID``, the node's
init; under a node that is itself a container, such as kind, the node's).
When the agent's namespace differs, the host path of the agent's namespace
root is found once, at start:

- the agent's root is a directory of the cgroup2 filesystem: the mount of
  it in the agent's own mount namespace whose mountinfo root is ``/``
  (container runtimes mount /sys/fs/cgroup that way), whose inode number is
  the cgroup's id;
- pid 1's mount namespace, reached through /proc/1/root, has the whole tree
  mounted; its mountinfo root, read from the agent's namespace, is ``/..``
  repeated once per level the agent's root lies below it;
- the directory at that depth with that inode (kernfs inode numbers are
  cgroup ids, never reused) names the agent's root, e.g.
  ``/kubepods.slice/.../cri-containerd-<id>.scope``.

A kernel path is then that root joined with the path, each ``..`` climbing
one level. When the mapping cannot be found the agent says why once, at
start, and reports paths as the kernel shows them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass

from vmctl_api.cgroup_paths import RULE, is_under, prefix_problem
from vmctl_server.core import procfs
from vmctl_server.core.faults import AccessDenied, ProcessGone

# Which cgroups a prefix selects is part of the contract, so the rule lives
# with the client's half of it; everything in the agent that matches a prefix
# (policy selectors, protection, ListProcesses) uses it from here.
__all__ = [
    "RULE",
    "CgroupView",
    "cgroup_of",
    "establish",
    "is_under",
    "memory_pressure",
    "prefix_problem",
    "read_cgroup",
    "view",
]

log = logging.getLogger("vmctl.cgroups")

# include/linux/proc_ns.h: the initial cgroup namespace's fixed inode number
# (namespaces made later get numbers from 0xF0000000 up).
INIT_CGROUP_NS_INODE = 0xEFFFFFFB
MAX_DIRECTORIES_LISTED = 100_000  # a node has thousands of cgroups; this bounds a pathological tree
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")  # show_mountinfo escapes space, tab, newline, backslash


@dataclass(frozen=True)
class CgroupView:
    """How kernel-shown cgroup paths become the node's paths."""

    root: str | None = None  # node path of the agent's namespace root; None: paths need no change
    problem: str = ""  # why paths could not be mapped, when they could not

    def absolute(self, path: str) -> str:
        """The node's path for ``path`` as the kernel showed it to the agent."""
        if self.root is None or not path:
            return path
        names = [name for name in self.root.split("/") if name]
        for name in path.split("/"):
            if name == "..":
                # Above the node's root (the node is itself namespaced): keep
                # the climb, as the kernel would show it from the node.
                if names and names[-1] != "..":
                    names.pop()
                else:
                    names.append(name)
            elif name:
                names.append(name)
        return "/" + "/".join(names)


class Unmappable(Exception):
    """Why the agent's cgroup namespace root cannot be placed in the node's tree."""


@dataclass(frozen=True)
class _Cgroup2Mount:
    root: str  # the mounted directory, relative to the reader's cgroup namespace root
    mount_point: str  # relative to the mount namespace's root directory


def _cgroup2_mounts(mountinfo: bytes) -> list[_Cgroup2Mount]:
    mounts = []
    for line in mountinfo.decode("utf-8", "surrogateescape").splitlines():
        fields, _, after = line.partition(" - ")
        before = fields.split()
        if after.split()[:1] == ["cgroup2"] and len(before) >= 5:
            root, mount_point = (_MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), f) for f in before[3:5])
            mounts.append(_Cgroup2Mount(root, mount_point))
    return mounts


def _levels_above(root: str) -> int | None:
    """For a mount root of only ``..`` components (an ancestor of the reader's
    namespace root), how many; None for any other root."""
    names = [name for name in root.split("/") if name]
    return len(names) if all(name == ".." for name in names) else None


def _own_root() -> os.stat_result:
    """The agent's namespace root directory, through its own cgroup2 mount."""
    for mount in _cgroup2_mounts(procfs.read_bytes(os.getpid(), "mountinfo")):
        if mount.root == "/":
            try:
                return os.stat(mount.mount_point)
            except OSError as exc:
                raise Unmappable(f"cannot stat the agent's cgroup2 mount {mount.mount_point}: {exc.strerror}") from exc
    raise Unmappable(
        "the agent's mount namespace has no cgroup2 mount of its cgroup namespace root"
        " (container runtimes mount one at /sys/fs/cgroup)"
    )


def _node_tree() -> tuple[str, int]:
    """pid 1's cgroup2 mount, as a path the agent can open, and how many
    levels above the agent's namespace root its root lies."""
    try:
        mounts = _cgroup2_mounts(procfs.read_bytes(1, "mountinfo"))
    except (AccessDenied, ProcessGone) as exc:
        raise Unmappable(f"cannot read pid 1's mounts: {exc.message}") from exc
    ancestors = [(levels, m) for m in mounts if (levels := _levels_above(m.root)) is not None]
    if not ancestors:
        raise Unmappable("pid 1's mount namespace has no cgroup2 mount of a cgroup above the agent's")
    levels, mount = max(ancestors, key=lambda pair: pair[0])
    return procfs.root_directory(1) + mount.mount_point, levels


def _find(tree: str, levels: int, target: os.stat_result) -> str:
    """The path under ``tree``, ``levels`` deep, of the directory ``target``."""
    try:
        top = os.stat(tree)
    except OSError as exc:
        raise Unmappable(f"cannot open pid 1's cgroup2 tree {tree}: {exc.strerror}") from exc
    if top.st_dev != target.st_dev:
        raise Unmappable(f"pid 1's cgroup2 tree {tree} is another filesystem than the agent's cgroup2 mount")
    if levels == 0:
        if top.st_ino == target.st_ino:
            return "/"
        raise Unmappable(f"the agent's cgroup namespace root is not the root of {tree}")
    level: list[tuple[str, str]] = [(tree, "")]  # (where to list, node path so far)
    listed = 0
    for depth in range(1, levels + 1):
        below = []
        for directory, path in level:
            listed += 1
            if listed > MAX_DIRECTORIES_LISTED:
                raise Unmappable(f"gave up after listing {MAX_DIRECTORIES_LISTED} directories of {tree}")
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        if depth == levels:
                            if entry.inode() == target.st_ino:
                                return f"{path}/{entry.name}"
                        else:
                            below.append((entry.path, f"{path}/{entry.name}"))
            except FileNotFoundError:
                continue  # removed while we looked
            except OSError as exc:
                raise Unmappable(f"cannot list {directory}: {exc.strerror}") from exc
        level = below
    raise Unmappable(
        f"no directory {levels} levels below {tree} is the agent's cgroup namespace root (cgroup id {target.st_ino})"
    )


def establish() -> CgroupView:
    """Find how this process's kernel-shown cgroup paths map to pid 1's view."""
    try:
        own = procfs.namespace_id(os.getpid(), "cgroup")
    except ProcessGone:
        return CgroupView()  # a kernel without cgroup namespaces (before 4.6): paths are absolute
    if own[1] == INIT_CGROUP_NS_INODE:  # (device, inode): the inode alone names the initial one
        return CgroupView()  # the kernel's paths are already absolute: the plain-host case
    try:
        if procfs.namespace_id(1, "cgroup") == own:
            return CgroupView()
    except (AccessDenied, ProcessGone) as exc:
        return CgroupView(problem=f"cannot compare with pid 1's cgroup namespace: {exc.message}")
    try:
        own_root = _own_root()
        tree, levels = _node_tree()
        return CgroupView(root=_find(tree, levels, own_root))
    except Unmappable as exc:
        return CgroupView(problem=str(exc))


@functools.cache
def view() -> CgroupView:
    """The mapping, found on first use and kept: the agent's first use is at
    start, when its policy reads the agent's own cgroup (to protect it)."""
    found = establish()
    if found.problem:
        log.warning(
            "cgroup paths cannot be mapped to the node's: %s; they are reported (and policy cgroup prefixes"
            " matched) as the agent's own cgroup namespace shows them",
            found.problem,
        )
    elif found.root is not None:
        log.info("the agent's cgroup namespace root is the node's %s: cgroup paths are reported from there", found.root)
    return found


def read_cgroup(pid: int) -> str:
    """The process's cgroup v2 path as the node names it (see :func:`view`)."""
    return view().absolute(procfs.read_cgroup_v2(pid))


def cgroup_of(proc: procfs.ProcessDir) -> str:
    """As :func:`read_cgroup`, through a /proc/PID already open."""
    return view().absolute(proc.cgroup_v2())


@functools.cache
def _hierarchy() -> str | None:
    """The directory that node paths name cgroups under, for reading their
    files, or None when the agent cannot reach one.

    On a plain host (or where paths could not be mapped, and are the agent's
    namespace's) that is the agent's own cgroup2 mount of its namespace root;
    in a cgroup namespace of its own, pid 1's tree, through /proc/1/root."""
    if view().root is not None:
        try:
            return _node_tree()[0]
        except Unmappable:
            return None
    try:
        mounts = _cgroup2_mounts(procfs.read_bytes(os.getpid(), "mountinfo"))
    except (AccessDenied, ProcessGone):
        return None
    return next((mount.mount_point for mount in mounts if mount.root == "/"), None)


def memory_pressure(path: str) -> procfs.Pressure | None:
    """The memory PSI of the cgroup at node path ``path`` (its memory.pressure),
    or None when there is none to read: no PSI or no cgroup v2, the cgroup
    gone, or a path the agent cannot place (one above its namespace's root)."""
    directory = _hierarchy()
    if directory is None or not path.startswith("/") or ".." in path.split("/"):
        return None
    return procfs.read_pressure(f"{directory}{path.rstrip('/')}/memory.pressure")
