"""ListProcesses and GetNodeInfo as plain values.

Both read cheap sources: per process, /proc/PID/stat, status and cgroup
(small, fixed-size texts, whatever the process's size), and for the node a
few files under /proc and /sys. The one dear fact, a process's VMA count, is
read only when asked for (``vma_count=True``): the kernel has no count to
give, so it is the line count of the whole /proc/PID/maps, which the kernel
prints VMA by VMA (about 0.7 us each; 50 ms for one process of 65,000 VMAs).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vmctl_server import __version__
from vmctl_server.core import cgroups, procfs
from vmctl_server.core.faults import AccessDenied, ProcessGone
from vmctl_server.core.kernel import Capabilities
from vmctl_server.core.targets import Target

# The last cgroup path component of a container carries its 64-hex id:
# docker/<id>, docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
# libpod-<id>.scope, or a bare <id> under kubepods (cgroupfs driver).
_CONTAINER_ID = re.compile(r"(?:^|[-/])([0-9a-f]{64})(?:\.scope)?$")


def container_id(cgroup_path: str) -> str:
    match = _CONTAINER_ID.search(cgroup_path)
    return match.group(1) if match else ""


@dataclass(frozen=True)
class ProcessSummary:
    pid: int
    start_time: int
    comm: str
    cgroup: str
    container_id: str
    rss_bytes: int
    swap_bytes: int
    vma_count: int
    uid: int
    ppid: int
    cpu_time_ns: int
    major_faults: int


def _summarize(
    proc: procfs.ProcessDir, cgroup_prefix: str, may_read: Callable[[Target], bool] | None, vma_count: bool
) -> ProcessSummary | None:
    cgroup = cgroups.cgroup_of(proc)
    if cgroup_prefix and not cgroups.is_under(cgroup, cgroup_prefix):
        return None
    stat = proc.stat()
    if stat.is_kernel_thread or stat.is_zombie:
        return None
    status = proc.status()
    if may_read is not None and not may_read(
        Target(proc.pid, status.uid, stat.comm, cgroup, stat.start_time, status.owner)
    ):
        return None
    return ProcessSummary(
        pid=proc.pid,
        start_time=stat.start_time,
        comm=stat.comm,
        cgroup=cgroup,
        container_id=container_id(cgroup),
        rss_bytes=status.rss_bytes,
        swap_bytes=status.swap_bytes,
        vma_count=proc.count_vmas() if vma_count else 0,
        uid=status.uid,
        ppid=stat.ppid,
        cpu_time_ns=stat.cpu_time_ns,
        major_faults=stat.major_faults,
    )


def list_processes(
    cgroup_prefix: str = "", may_read: Callable[[Target], bool] | None = None, vma_count: bool = False
) -> list[ProcessSummary]:
    """User processes (no kernel threads, no zombies) in the cgroup
    ``cgroup_prefix`` names or below it (:func:`cgroups.is_under`; "" for
    all), and of those only the ones ``may_read`` accepts when it is given
    (the policy, judging the same facts it judges a GetVmaInfo on). Each
    process's facts are read through one open /proc/PID, so they are of one
    process. Processes that exit mid-read are left out. ``vma_count`` fills
    each one's VMA count (0 otherwise): the dear part, see the module."""
    summaries = []
    for pid in procfs.list_pids():
        try:
            with procfs.ProcessDir(pid) as proc:
                summary = _summarize(proc, cgroup_prefix, may_read, vma_count)
        except (ProcessGone, AccessDenied):
            continue
        if summary is not None:
            summaries.append(summary)
    return summaries


def cgroup_memory_pressure(paths: Iterable[str]) -> dict[str, procfs.Pressure]:
    """The memory PSI of each cgroup in ``paths`` (node paths), read once each;
    a cgroup with none to read (:func:`cgroups.memory_pressure`) is left out."""
    found = {path: cgroups.memory_pressure(path) for path in set(paths)}
    return {path: pressure for path, pressure in found.items() if pressure is not None}


@dataclass(frozen=True)
class NodeInfo:
    hostname: str
    kernel: str
    machine: str
    boot_id: str
    mem_total_bytes: int
    mem_available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    memory_pressure: dict[str, dict[str, float]] | None
    capabilities: Capabilities
    agent_version: str
    page_size: int


def node_info(capabilities: Capabilities) -> NodeInfo:
    uname = os.uname()
    cgroup_problem = cgroups.view().problem
    if cgroup_problem:  # cgroup paths are the agent's namespace's, not the node's: say why
        capabilities = dataclasses.replace(
            capabilities, probe_errors={**capabilities.probe_errors, "cgroup_paths": cgroup_problem}
        )
    meminfo = procfs.read_meminfo()
    return NodeInfo(
        hostname=uname.nodename,
        kernel=uname.release,
        machine=uname.machine,
        boot_id=procfs.boot_id(),
        mem_total_bytes=meminfo.get("MemTotal", 0),
        mem_available_bytes=meminfo.get("MemAvailable", 0),
        swap_total_bytes=meminfo.get("SwapTotal", 0),
        swap_free_bytes=meminfo.get("SwapFree", 0),
        memory_pressure=procfs.read_memory_pressure(),
        capabilities=capabilities,
        agent_version=__version__,
        page_size=os.sysconf("SC_PAGE_SIZE"),
    )
