"""The facts about a process that the policy selects on, read as one.

Plain values, read through one open /proc/PID (:class:`procfs.ProcessDir`), so
they are all of one process; the access layer judges them.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmctl_server.core import cgroups, procfs
from vmctl_server.core.faults import ProcessChanged


@dataclass(frozen=True)
class Target:
    """The facts about a process that rules select on."""

    pid: int
    uid: int  # real uid (/proc/PID/status): who started it; the audit log's target_uid
    comm: str
    cgroup: str  # cgroup v2 path, as the node names it
    start_time: int
    owner: int | None = None  # the uid it wholly belongs to (procfs.ProcStatus.owner): what `uids` select
    exec_id: bytes = b""  # the image the facts were read from, when known (snapshot.Identity.exec_id)

    def describe(self) -> str:
        """Everything rules saw: only for callers that may read the process."""
        owner = "" if self.owner == self.uid else ", belongs to no uid"
        return f"pid {self.pid} ({self.comm}, uid {self.uid}{owner}, cgroup {self.cgroup or '?'})"

    def describe_to(self, readable: bool) -> str:
        """:meth:`describe` for a caller that may read the process, else its pid alone."""
        return self.describe() if readable else f"pid {self.pid}"


def read_target(
    pid: int, comm: str | None = None, start_time: int | None = None, exec_id: bytes | None = None
) -> Target:
    """The facts rules select on, all read through one open /proc/PID, so all
    of one process (:class:`procfs.ProcessDir`).

    A caller that already identified the process (through a pidfd) passes its
    ``comm``, ``start_time`` and ``exec_id``; a process that is no longer that
    one is PROCESS_CHANGED. Otherwise the image is named first and its facts
    read after, so a later check that the same image is still there (the
    snapshot's exec id, see ``Guard.same_process``) vouches for the facts.
    """
    with procfs.ProcessDir(pid) as proc:
        first = proc.stat()
        procfs.require_user_process(first)
        if start_time is not None and first.start_time != start_time:
            raise ProcessChanged(f"pid {pid} became another process while it was checked", pid=pid)
        image = exec_id if exec_id is not None else proc.exec_id()
        stat = first if exec_id is not None else proc.stat()  # the comm of the image just named
        status = proc.status()
        cgroup = cgroups.cgroup_of(proc)
    return Target(pid, status.uid, comm or stat.comm, cgroup, stat.start_time, status.owner, image)
